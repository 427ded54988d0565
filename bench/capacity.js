// Capacity: POST /payments at a rising constant arrival rate, in steps (k6 ramping-arrival-rate).
// Run through bench/capacity.py (`make bench CAPACITY=1`); it finds the highest step sustained.
//
// Each step ramps for RAMP_S to its rate, then holds it for STEP_S; only the requests started
// while a step holds count for it (tag {step: k}; the ramps are tagged {step: ramp}). Every
// payment has a fresh correlationId and amount 19.90, client timeout 1.5 s as in the contest.
//
// Environment: TARGET_URL (http://localhost:9999)  START_RATE (500 per second)
//   STEP_RATE (500)  STEPS (12)  STEP_S (5)  MAX_VUS (1000)  OUT_FILE (capacity.json)
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';

const TARGET_URL = (__ENV.TARGET_URL || 'http://localhost:9999').replace(/\/+$/, '');
const START_RATE = parseInt(__ENV.START_RATE || '500', 10);
const STEP_RATE = parseInt(__ENV.STEP_RATE || '500', 10);
const STEPS = parseInt(__ENV.STEPS || '12', 10);
const STEP_S = parseFloat(__ENV.STEP_S || '5');
const RAMP_S = 1;
const MAX_VUS = parseInt(__ENV.MAX_VUS || '1000', 10);
const PRE_ALLOCATED_VUS = 50;
const OUT_FILE = __ENV.OUT_FILE || 'capacity.json';

const RATES = Array.from({ length: STEPS }, (_, k) => START_RATE + k * STEP_RATE);
const failed = new Counter('failed_requests');

const stages = [];
RATES.forEach((rate) => {
  stages.push({ duration: `${RAMP_S}s`, target: rate });
  stages.push({ duration: `${STEP_S}s`, target: rate });
});

// Declared so that the per-step sub-metrics appear in the summary data; they always pass.
const thresholds = {};
RATES.forEach((_, k) => {
  thresholds[`http_req_duration{step:${k}}`] = ['p(99)>=0'];
  thresholds[`http_reqs{step:${k}}`] = ['count>=0'];
  thresholds[`failed_requests{step:${k}}`] = ['count>=0'];
});

export const options = {
  summaryTrendStats: ['med', 'max', 'p(99)'],
  thresholds,
  scenarios: {
    capacity: {
      executor: 'ramping-arrival-rate',
      exec: 'pay',
      startRate: RATES[0],
      timeUnit: '1s',
      preAllocatedVUs: PRE_ALLOCATED_VUS,
      maxVUs: MAX_VUS,
      stages,
      gracefulStop: '2s',
    },
  },
};

const HEADERS = { 'Content-Type': 'application/json' };

export function pay() {
  const elapsed = Date.now() - exec.scenario.startTime;
  const period = (RAMP_S + STEP_S) * 1000;
  const k = Math.floor(elapsed / period);
  const holding = k < STEPS && elapsed - k * period >= RAMP_S * 1000;
  const tags = { step: holding ? String(k) : 'ramp' };
  const body = `{"correlationId":"${crypto.randomUUID()}","amount":19.90}`;
  const res = http.post(`${TARGET_URL}/payments`, body, { headers: HEADERS, timeout: '1500ms', tags });
  if (!(res.status >= 200 && res.status < 300)) {
    failed.add(1, tags);
  }
}

function value(data, name, stat) {
  const m = data.metrics[name];
  return m && m.values[stat] !== undefined ? m.values[stat] : null;
}

export function handleSummary(data) {
  const steps = RATES.map((rate, k) => {
    const requests = value(data, `http_reqs{step:${k}}`, 'count') || 0;
    return {
      rate,
      requests,
      achieved_rate: requests / STEP_S,
      p99_ms: value(data, `http_req_duration{step:${k}}`, 'p(99)'),
      p50_ms: value(data, `http_req_duration{step:${k}}`, 'med'),
      max_ms: value(data, `http_req_duration{step:${k}}`, 'max'),
      failed: value(data, `failed_requests{step:${k}}`, 'count') || 0,
    };
  });
  const out = {
    target_url: TARGET_URL,
    step_s: STEP_S,
    ramp_s: RAMP_S,
    max_vus: MAX_VUS,
    dropped_iterations: value(data, 'dropped_iterations', 'count') || 0,
    steps,
  };
  const lines = steps.map((s) => `  ${String(s.rate).padStart(6)}/s offered  ${s.achieved_rate.toFixed(0).padStart(6)}/s done  ` +
    `p99 ${s.p99_ms === null ? '-' : s.p99_ms.toFixed(2)} ms  failed ${s.failed}`);
  return {
    stdout: `capacity of ${TARGET_URL}\n${lines.join('\n')}\n`,
    [OUT_FILE]: JSON.stringify(out, null, 2) + '\n',
  };
}
