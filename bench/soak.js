// The soak (`make soak`, run through bench/soak.py): POST /payments at a constant arrival rate,
// unique ids, amount 19.90, client timeout 1.5 s, as the contest's requests.
// Environment: BACKEND_URL  RATE (per second)  DURATION_S  SLICE_S  MAX_VUS  SUMMARY_PATH (the JSON written)
//
// POST /payments at a constant arrival rate; every request is tagged with its slice so
// the thresholds below give one p99 (and one failure rate) per slice in the summary.
import http from 'k6/http';

const URL = __ENV.BACKEND_URL;
const RATE = parseInt(__ENV.RATE);
const DURATION_S = parseInt(__ENV.DURATION_S);
const SLICE_S = parseInt(__ENV.SLICE_S);
const SLICES = Math.ceil(DURATION_S / SLICE_S);

const thresholds = {};
for (let i = 0; i < SLICES; i++) {
  thresholds[`http_req_duration{slice:${i}}`] = ['max>=0'];
  thresholds[`http_req_failed{slice:${i}}`] = ['rate>=0'];
}

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['med', 'p(99)', 'max', 'count'],
  thresholds: thresholds,
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
      duration: `${DURATION_S}s`, preAllocatedVUs: 100, maxVUs: parseInt(__ENV.MAX_VUS),
    },
  },
};

export function setup() {
  return { start: Date.now() };
}

export default function (data) {
  const slice = Math.min(SLICES - 1, Math.floor((Date.now() - data.start) / (SLICE_S * 1000)));
  const body = JSON.stringify({ correlationId: crypto.randomUUID(), amount: 19.90 });
  http.post(`${URL}/payments`, body, {
    headers: { 'Content-Type': 'application/json' },
    timeout: '1500ms',
    tags: { slice: String(slice) },
  });
}

export function handleSummary(data) {
  const out = { slices: [] };
  for (let i = 0; i < SLICES; i++) {
    const d = data.metrics[`http_req_duration{slice:${i}}`];
    const f = data.metrics[`http_req_failed{slice:${i}}`];
    out.slices.push({
      requests: d ? d.values.count : 0,
      med_ms: d ? d.values.med : null,
      p99_ms: d ? d.values['p(99)'] : null,
      max_ms: d ? d.values.max : null,
      failed: f ? f.values.passes : 0,
    });
  }
  const all = data.metrics.http_req_duration.values;
  out.total = { requests: all.count, p99_ms: all['p(99)'], max_ms: all.max,
                failed: data.metrics.http_req_failed.values.passes,
                dropped: data.metrics.dropped_iterations ? data.metrics.dropped_iterations.values.count : 0 };
  return { [__ENV.SUMMARY_PATH]: JSON.stringify(out, null, 2) };
}
