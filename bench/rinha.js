// The Rinha de Backend 2025 scenario, written for this project from CONTRACT.md §5.
// Run through bench/load.py (`make load`); see that file for the knobs.
//
// Environment:
//   BACKEND_URL (http://localhost:9999)  DEFAULT_ADMIN_URL (http://localhost:8001)
//   FALLBACK_ADMIN_URL (http://localhost:8002)  MAX_REQUESTS (550)  DURATION_S (60)
//   PHASES (./phases/contest.json, relative to this file)  PROCESSOR_TOKEN (123)
//   PURGE_TOKEN (unset: purge is sent without the header)  OUT_DIR (bench/out, relative to cwd)
//   AMOUNTS (fixed: every payment 19.90, as the contest; random: uniform whole cents in
//   [RANDOM_MIN_CENTS, RANDOM_MAX_CENTS], i.e. 0.01 to 10,000.00)
//
// Besides the contest's figures, the summary records per second of the test the payments
// answered 2xx and their amount in cents (tagged by the second in which the answer came), which
// bench/oracle.py turns into the profit a router knowing the schedule would have made.
import http from 'k6/http';
import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';

const BACKEND_URL = __ENV.BACKEND_URL || 'http://localhost:9999';
const DEFAULT_ADMIN_URL = __ENV.DEFAULT_ADMIN_URL || 'http://localhost:8001';
const FALLBACK_ADMIN_URL = __ENV.FALLBACK_ADMIN_URL || 'http://localhost:8002';
const MAX_REQUESTS = parseInt(__ENV.MAX_REQUESTS || '550', 10);
const DURATION_S = parseFloat(__ENV.DURATION_S || '60');
const INITIAL_TOKEN = __ENV.PROCESSOR_TOKEN || '123';
const PURGE_TOKEN = __ENV.PURGE_TOKEN || '';
const OUT_DIR = (__ENV.OUT_DIR || 'bench/out').replace(/\/+$/, '');
const PHASES_PATH = __ENV.PHASES || './phases/contest.json';
const PHASES = JSON.parse(open(PHASES_PATH)).slice().sort((a, b) => a.at_s - b.at_s);
const CHECK_EVERY_S = 10;
const FIXED_AMOUNT_CENTS = 1990;
const RANDOM_MIN_CENTS = 1;
const RANDOM_MAX_CENTS = 1000000;
const AMOUNTS = (__ENV.AMOUNTS || 'fixed').toLowerCase();
if (AMOUNTS !== 'fixed' && AMOUNTS !== 'random') {
  throw new Error(`AMOUNTS must be fixed or random, not ${__ENV.AMOUNTS}`);
}

const paymentsOk = new Counter('payments_ok');
const paymentsFailed = new Counter('payments_failed');
const inconsistencies = new Counter('inconsistencies');
const consistencyErrors = new Counter('consistency_check_errors');
const phaseErrors = new Counter('phase_errors');
// Payments answered 2xx and their amounts in whole cents (sums of integers: exact in a float64
// up to 2^53), tagged {sec: whole seconds since the scenarios started} when the answer came.
// The last slot also takes anything later (the test ends within gracefulStop of DURATION_S).
const SLOTS = Math.ceil(DURATION_S) + 10;
const acceptedPayments = new Counter('accepted_payments');
const acceptedCents = new Counter('accepted_cents');
// When the scenarios started and when the teardown read the summaries (epoch ms).
const startMark = new Counter('scenario_start_epoch_ms');
const teardownMark = new Counter('teardown_epoch_ms');
// When each phase was applied (epoch ms), so that tests can query the processors per phase.
const phaseMarks = PHASES.map((_, i) => new Counter(`phase_${i}_epoch_ms`));
// Filled once by teardown so that handleSummary can compute the score.
const T = {
  gross: new Counter('t_gross'),
  defReq: new Counter('t_default_total_requests'),
  defAmount: new Counter('t_default_total_amount'),
  fbReq: new Counter('t_fallback_total_requests'),
  fbAmount: new Counter('t_fallback_total_amount'),
  fees: new Counter('t_fees'),
  defFeeRate: new Counter('t_default_fee_per_transaction'),
  fbFeeRate: new Counter('t_fallback_fee_per_transaction'),
  defCents: new Counter('t_default_total_cents'),
  fbCents: new Counter('t_fallback_total_cents'),
  procDefCents: new Counter('t_processor_default_total_cents'),
  procFbCents: new Counter('t_processor_fallback_total_cents'),
  procDefReq: new Counter('t_processor_default_total_requests'),
  procFbReq: new Counter('t_processor_fallback_total_requests'),
  teardownErrors: new Counter('t_errors'),
};

// Declaring the thresholds makes these sub-metrics appear in the summary data; they always pass.
const thresholds = {
  'http_req_duration{expected_response:true}': ['p(99)>=0'],
  'http_req_duration{name:payments}': ['p(99)>=0'],
};
for (let k = 0; k < SLOTS; k++) {
  thresholds[`accepted_payments{sec:${k}}`] = ['count>=0'];
  thresholds[`accepted_cents{sec:${k}}`] = ['count>=0'];
}

export const options = {
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  thresholds,
  setupTimeout: '30s',
  teardownTimeout: '60s',
  scenarios: {
    payments: {
      executor: 'ramping-vus',
      exec: 'payment',
      startVUs: 1,
      stages: [{ duration: `${DURATION_S}s`, target: MAX_REQUESTS }],
      gracefulRampDown: '0s',
      gracefulStop: '5s',
    },
    phases: {
      executor: 'per-vu-iterations',
      exec: 'phases',
      vus: 1,
      iterations: 1,
      maxDuration: `${DURATION_S + 30}s`,
    },
    consistency: {
      executor: 'per-vu-iterations',
      exec: 'consistency',
      vus: 1,
      iterations: 1,
      maxDuration: `${DURATION_S + 30}s`,
    },
  },
};

function adminParams(token) {
  return {
    headers: { 'Content-Type': 'application/json', 'X-Rinha-Token': token },
    timeout: '10s',
  };
}

function summaryQuery(fromMs, toMs) {
  return `from=${new Date(fromMs).toISOString()}&to=${new Date(toMs).toISOString()}`;
}

function getJson(url, params) {
  const res = http.get(url, params);
  if (res.status !== 200) {
    return null;
  }
  try {
    return res.json();
  } catch (e) {
    return null;
  }
}

function applyPhase(token, phase) {
  const targets = [
    [DEFAULT_ADMIN_URL, phase.default || {}],
    [FALLBACK_ADMIN_URL, phase.fallback || {}],
  ];
  for (const [url, cfg] of targets) {
    const p = adminParams(token);
    const r1 = http.put(`${url}/admin/configurations/delay`, JSON.stringify({ delay: cfg.delay || 0 }), p);
    const r2 = http.put(`${url}/admin/configurations/failure`, JSON.stringify({ failure: !!cfg.failure }), p);
    if (r1.status !== 200 || r2.status !== 200) {
      phaseErrors.add(1);
    }
  }
}

function randomToken() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function setup() {
  const token = randomToken();
  for (const url of [DEFAULT_ADMIN_URL, FALLBACK_ADMIN_URL]) {
    const res = http.put(`${url}/admin/configurations/token`, JSON.stringify({ token }), adminParams(INITIAL_TOKEN));
    if (res.status !== 204 && res.status !== 200) {
      exec.test.abort(`setup: ${url} refused the token change with ${res.status} ` +
        `(token ${INITIAL_TOKEN}); a previous run may have been interrupted: restart the processors`);
    }
  }
  for (const url of [DEFAULT_ADMIN_URL, FALLBACK_ADMIN_URL]) {
    const res = http.post(`${url}/admin/purge-payments`, null, adminParams(token));
    if (res.status !== 200) {
      exec.test.abort(`setup: purging ${url} answered ${res.status}`);
    }
  }
  const purgeHeaders = PURGE_TOKEN ? { 'X-Rinha-Token': PURGE_TOKEN } : {};
  http.post(`${BACKEND_URL}/purge-payments`, null, { headers: purgeHeaders, timeout: '10s' });
  if (PHASES.length && PHASES[0].at_s <= 0) {
    applyPhase(token, PHASES[0]);
    phaseMarks[0].add(Date.now());
  }
  return { token, startMs: Date.now() };
}

function amountCents() {
  if (AMOUNTS === 'fixed') {
    return FIXED_AMOUNT_CENTS;
  }
  return RANDOM_MIN_CENTS + Math.floor(Math.random() * (RANDOM_MAX_CENTS - RANDOM_MIN_CENTS + 1));
}

export function payment() {
  const cents = amountCents();
  // cents / 100 is the double nearest the decimal; JSON.stringify writes it back as that decimal.
  const body = JSON.stringify({ correlationId: crypto.randomUUID(), amount: cents / 100 });
  const res = http.post(`${BACKEND_URL}/payments`, body, {
    headers: { 'Content-Type': 'application/json' },
    timeout: '1500ms',
    tags: { name: 'payments' },
  });
  if (res.status >= 200 && res.status < 300) {
    paymentsOk.add(1);
    const sec = Math.min(SLOTS - 1, Math.max(0, Math.floor((Date.now() - exec.scenario.startTime) / 1000)));
    const tags = { sec: String(sec) };
    acceptedPayments.add(1, tags);
    acceptedCents.add(cents, tags);
  } else {
    paymentsFailed.add(1);
  }
  sleep(1);
}

function sleepUntil(startMs, atS) {
  const waitMs = startMs + atS * 1000 - Date.now();
  if (waitMs > 0) {
    sleep(waitMs / 1000);
  }
}

export function phases(data) {
  const startMs = exec.scenario.startTime;
  startMark.add(startMs);
  PHASES.forEach((phase, i) => {
    if (phase.at_s <= 0 || phase.at_s >= DURATION_S) {
      return; // applied in setup, or after the end
    }
    sleepUntil(startMs, phase.at_s);
    applyPhase(data.token, phase);
    phaseMarks[i].add(Date.now());
  });
}

export function consistency(data) {
  const startMs = exec.scenario.startTime;
  inconsistencies.add(0);
  consistencyErrors.add(0);
  for (let k = 1; k * CHECK_EVERY_S <= DURATION_S; k++) {
    sleepUntil(startMs, k * CHECK_EVERY_S);
    const now = Date.now();
    const q = summaryQuery(now - 15000, now - 1500);
    const backend = getJson(`${BACKEND_URL}/payments-summary?${q}`, { timeout: '10s' });
    const def = getJson(`${DEFAULT_ADMIN_URL}/admin/payments-summary?${q}`, adminParams(data.token));
    const fb = getJson(`${FALLBACK_ADMIN_URL}/admin/payments-summary?${q}`, adminParams(data.token));
    if (!backend || !backend.default || !backend.fallback || !def || !fb) {
      consistencyErrors.add(1);
      continue;
    }
    const diff = Math.abs(backend.default.totalRequests - def.totalRequests) +
      Math.abs(backend.fallback.totalRequests - fb.totalRequests);
    inconsistencies.add(diff);
    if (diff > 0) {
      console.warn(`consistency check at ${q}: backend ${JSON.stringify(backend)} ` +
        `default ${def.totalRequests} fallback ${fb.totalRequests}`);
    }
  }
}

function cents(x) {
  return Math.round(x * 100);
}

export function teardown(data) {
  const now = Date.now();
  teardownMark.add(now);
  const q = summaryQuery(now - (DURATION_S + 10) * 1000, now);
  const backend = getJson(`${BACKEND_URL}/payments-summary?${q}`, { timeout: '20s' });
  const def = getJson(`${DEFAULT_ADMIN_URL}/admin/payments-summary?${q}`, adminParams(data.token));
  const fb = getJson(`${FALLBACK_ADMIN_URL}/admin/payments-summary?${q}`, adminParams(data.token));
  if (!backend || !backend.default || !backend.fallback || !def || !fb) {
    T.teardownErrors.add(1);
  } else {
    const dAmt = backend.default.totalAmount;
    const fAmt = backend.fallback.totalAmount;
    const fees = def.feePerTransaction * dAmt + fb.feePerTransaction * fAmt;
    T.gross.add(dAmt + fAmt);
    T.fees.add(fees);
    T.defReq.add(backend.default.totalRequests);
    T.defAmount.add(dAmt);
    T.fbReq.add(backend.fallback.totalRequests);
    T.fbAmount.add(fAmt);
    T.defFeeRate.add(def.feePerTransaction);
    T.fbFeeRate.add(fb.feePerTransaction);
    T.procDefReq.add(def.totalRequests);
    T.procFbReq.add(fb.totalRequests);
    T.defCents.add(cents(dAmt));
    T.fbCents.add(cents(fAmt));
    T.procDefCents.add(cents(def.totalAmount));
    T.procFbCents.add(cents(fb.totalAmount));
    T.teardownErrors.add(0);
  }
  // Leave the processors as the next run expects them: healthy, with the initial token.
  applyPhase(data.token, { default: {}, fallback: {} });
  for (const url of [DEFAULT_ADMIN_URL, FALLBACK_ADMIN_URL]) {
    http.put(`${url}/admin/configurations/token`, JSON.stringify({ token: INITIAL_TOKEN }), adminParams(data.token));
  }
}

function round2(x) {
  return Math.round((x + Number.EPSILON) * 100) / 100;
}

function count(data, name) {
  const m = data.metrics[name];
  return m ? m.values.count : 0;
}

function trend(data, name, stat) {
  const m = data.metrics[name];
  return m && m.values[stat] !== undefined ? m.values[stat] : null;
}

function computeResult(data) {
  const p99 = round2(trend(data, 'http_req_duration{expected_response:true}', 'p(99)') || 0);
  // The contest caps the bonus at 20 % (reached at p99 <= 1.25 ms).
  const bonus = Math.min(0.2, round2(Math.max((11 - p99) * 0.02, 0)));
  const inc = count(data, 'inconsistencies');
  const fine = inc > 0 ? 0.35 : 0;
  const gross = count(data, 't_gross');
  const fees = count(data, 't_fees');
  const ok = count(data, 'payments_ok');
  const defReq = count(data, 't_default_total_requests');
  const fbReq = count(data, 't_fallback_total_requests');
  const lag = ok - (defReq + fbReq);
  const teardownOk = !!data.metrics.t_errors && count(data, 't_errors') === 0;
  const slots = Array.from({ length: SLOTS }, (_, k) => k);
  const acceptedBySec = slots.map((k) => count(data, `accepted_payments{sec:${k}}`));
  const centsBySec = slots.map((k) => count(data, `accepted_cents{sec:${k}}`));
  const acceptedCentsTotal = centsBySec.reduce((a, b) => a + b, 0);
  const defCents = count(data, 't_default_total_cents');
  const fbCents = count(data, 't_fallback_total_cents');
  const procDefCents = count(data, 't_processor_default_total_cents');
  const procFbCents = count(data, 't_processor_fallback_total_cents');
  return {
    score: round2((gross - fees) * (1 + bonus - fine)),
    gross: round2(gross),
    fees: round2(fees),
    net: round2(gross - fees),
    p99,
    bonus,
    inconsistencies: inc,
    consistency_check_errors: count(data, 'consistency_check_errors'),
    fine,
    lag,
    disqualified: lag < 0,
    successful_posts: ok,
    failed_posts: count(data, 'payments_failed'),
    default: {
      totalRequests: defReq,
      totalAmount: round2(count(data, 't_default_total_amount')),
      processorTotalRequests: count(data, 't_processor_default_total_requests'),
    },
    fallback: {
      totalRequests: fbReq,
      totalAmount: round2(count(data, 't_fallback_total_amount')),
      processorTotalRequests: count(data, 't_processor_fallback_total_requests'),
    },
    amounts: AMOUNTS,
    // Amounts compared exactly, in whole cents (teardown window).
    accepted_cents: acceptedCentsTotal,
    reported_cents: { default: defCents, fallback: fbCents },
    processor_cents: { default: procDefCents, fallback: procFbCents },
    // What the backend reports minus what each processor stored: must be 0 for both.
    amount_mismatch_cents: { default: defCents - procDefCents, fallback: fbCents - procFbCents },
    // Accepted minus reported amount: the lag in cents (negative: more reported than accepted).
    amount_lag_cents: acceptedCentsTotal - (defCents + fbCents),
    fee_rates: { default: count(data, 't_default_fee_per_transaction'),
      fallback: count(data, 't_fallback_fee_per_transaction') },
    // Per second since the scenarios started: payments answered 2xx in it, and their cents.
    accepted_by_sec: acceptedBySec,
    accepted_cents_by_sec: centsBySec,
    schedule: PHASES,
    scenario_start_epoch_ms: count(data, 'scenario_start_epoch_ms') || null,
    teardown_epoch_ms: count(data, 'teardown_epoch_ms') || null,
    payments_p99_ms: round2(trend(data, 'http_req_duration{name:payments}', 'p(99)') || 0),
    payments_p50_ms: round2(trend(data, 'http_req_duration{name:payments}', 'med') || 0),
    payments_max_ms: round2(trend(data, 'http_req_duration{name:payments}', 'max') || 0),
    http_reqs: count(data, 'http_reqs'),
    phase_errors: count(data, 'phase_errors'),
    // epoch ms at which each phase of the schedule was applied (null: never, e.g. after the end)
    phase_epochs_ms: PHASES.map((_, i) => (data.metrics[`phase_${i}_epoch_ms`] ?
      count(data, `phase_${i}_epoch_ms`) : null)),
    teardown_ok: teardownOk,
    max_requests: MAX_REQUESTS,
    duration_s: DURATION_S,
    phases: PHASES_PATH,
    backend_url: BACKEND_URL,
    test_run_duration_ms: Math.round(data.state.testRunDurationMs),
  };
}

function fmt(x) {
  const [int, frac] = Math.abs(x).toFixed(2).split('.');
  return (x < 0 ? '-' : '') + int.replace(/\B(?=(\d{3})+(?!\d))/g, ',') + '.' + frac;
}

function report(r) {
  const lines = [
    '',
    '================ Rinha de Backend 2025: result (project k6 script) ================',
    `  payments requested (2xx)   ${r.successful_posts}   failed POSTs ${r.failed_posts}`,
    `  default                    ${r.default.totalRequests} payments, ${fmt(r.default.totalAmount)}`,
    `  fallback                   ${r.fallback.totalRequests} payments, ${fmt(r.fallback.totalAmount)}`,
    `  gross                      ${fmt(r.gross)}`,
    `  fees                       ${fmt(r.fees)}`,
    `  net                        ${fmt(r.net)}`,
    `  p99 (all expected reqs)    ${r.p99} ms   -> bonus ${(r.bonus * 100).toFixed(0)} %`,
    `  POST /payments             p50 ${r.payments_p50_ms} ms  p99 ${r.payments_p99_ms} ms  max ${r.payments_max_ms} ms`,
    `  inconsistencies            ${r.inconsistencies}   -> fine ${(r.fine * 100).toFixed(0)} %` +
      (r.consistency_check_errors ? `   (${r.consistency_check_errors} checks could not run)` : ''),
    `  lag                        ${r.lag}${r.disqualified ? '   DISQUALIFIED (negative lag)' : ''}`,
    `  ${`amounts (${r.amounts})`.padEnd(27)}accepted ${fmt(r.accepted_cents / 100)}, ` +
      `reported ${fmt((r.reported_cents.default + r.reported_cents.fallback) / 100)}` +
      (r.amount_mismatch_cents.default || r.amount_mismatch_cents.fallback ?
        `   MISMATCH with the processors: default ${r.amount_mismatch_cents.default} cents, ` +
        `fallback ${r.amount_mismatch_cents.fallback} cents` : '   (= processors, to the cent)'),
    `  SCORE                      ${fmt(r.score)}`,
  ];
  if (!r.teardown_ok) {
    lines.push('  WARNING: teardown could not read the summaries; gross/fees/lag are not meaningful');
  }
  if (r.phase_errors) {
    lines.push(`  WARNING: ${r.phase_errors} processor phase changes were refused`);
  }
  lines.push('====================================================================================', '');
  return lines.join('\n');
}

export function handleSummary(data) {
  const r = computeResult(data);
  return {
    stdout: report(r),
    [`${OUT_DIR}/result.json`]: JSON.stringify(r, null, 2) + '\n',
    [`${OUT_DIR}/k6-summary.json`]: JSON.stringify(data, null, 1) + '\n',
  };
}
