"use strict";
// The live page: fetch this server's /metrics every few seconds, keep the last minutes of
// snapshots in memory, and draw rates and histogram percentiles computed from them (as
// Prometheus' rate() and histogram_quantile() would over the same window).
(() => {
  const PREFIX = document.body.dataset.prefix || "zeroserve";
  const query = new URLSearchParams(location.search);
  const INTERVAL_MS = Math.max(200, Number(query.get("interval_ms")) || 2000);
  const KEEP_MS = 5 * 60 * 1000;
  const RATE_MS = 10 * 1000;
  const PERCENTILE_MS = 30 * 1000;
  const COLORS = ["#2f6fdf", "#e0722d", "#c23b6b"];
  const history = [];

  // ------------------------------------------------------------------ reading /metrics
  function parse(text) {
    const out = new Map();
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:\\.|[^"\\])*)"/g)) labels[l[1]] = l[2];
      if (!out.has(m[1])) out.set(m[1], []);
      out.get(m[1]).push({ labels, value: Number(m[3]) });
    }
    return out;
  }
  const full = (name) => `${PREFIX}:${name}`;
  const samples = (m, name) => m.get(full(name)) || [];
  const total = (m, name) => samples(m, name).reduce((a, s) => a + s.value, 0);
  const present = (m, name) => samples(m, name).length > 0;

  function buckets(m, name) {
    const out = new Map();
    for (const s of samples(m, name + "_bucket")) {
      const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
      out.set(le, (out.get(le) || 0) + s.value);
    }
    return out;
  }

  function snapshot(m, t) {
    const kv = samples(m, "kv_cache_usage_perc");
    const any = samples(m, "num_requests_running")[0] || samples(m, "generation_tokens_total")[0];
    return {
      t,
      model: any ? any.labels.model_name : "",
      generated: total(m, "generation_tokens_total"),
      prompt: total(m, "prompt_tokens_total"),
      finished: total(m, "request_success_total"),
      errors: total(m, "request_errors_total"),
      hits: total(m, "prefix_cache_hits_total"),
      queries: total(m, "prefix_cache_queries_total"),
      running: present(m, "num_requests_running") ? total(m, "num_requests_running") : null,
      waiting: present(m, "num_requests_waiting") ? total(m, "num_requests_waiting") : null,
      kv: kv.length ? (100 * kv.reduce((a, s) => a + s.value, 0)) / kv.length : null,
      ttft: buckets(m, "time_to_first_token_seconds"),
      itl: buckets(m, "inter_token_latency_seconds"),
      e2e: buckets(m, "e2e_request_latency_seconds"),
    };
  }

  // ------------------------------------------------------------------ rates and percentiles
  function before(i, ms) {
    // the latest snapshot at least ms older than history[i] (else the oldest kept), or null
    if (i === 0) return null;
    let j = i - 1;
    while (j > 0 && history[i].t - history[j].t < ms) j--;
    return history[j];
  }

  function rate(i, key) {
    const a = before(i, RATE_MS);
    const b = history[i];
    if (!a || b[key] < a[key]) return null; // a counter went back: the server restarted
    return (b[key] - a[key]) / ((b.t - a.t) / 1000);
  }

  function quantile(q, now, then) {
    // histogram_quantile over what was observed between two snapshots (then null: since start)
    const bounds = [...now.keys()].sort((x, y) => x - y);
    const counts = bounds.map((le) => now.get(le) - ((then && then.get(le)) || 0));
    const n = counts[counts.length - 1];
    if (!(n > 0)) return null;
    const rank = q * n;
    let lower = 0;
    let below = 0;
    for (let k = 0; k < bounds.length; k++) {
      if (counts[k] >= rank) {
        if (bounds[k] === Infinity) return lower; // as Prometheus: the highest finite bound
        const inside = counts[k] - below;
        return inside > 0 ? lower + ((bounds[k] - lower) * (rank - below)) / inside : bounds[k];
      }
      lower = bounds[k];
      below = counts[k];
    }
    return lower;
  }

  function percentile(i, key, q) {
    const a = before(i, PERCENTILE_MS);
    return a ? quantile(q, history[i][key], a[key]) : null;
  }

  const percentiles = (key) => [
    ["p50", (i) => percentile(i, key, 0.5)],
    ["p90", (i) => percentile(i, key, 0.9)],
    ["p99", (i) => percentile(i, key, 0.99)],
  ];

  const CHARTS = {
    "chart-throughput": [
      ["output", (i) => rate(i, "generated")],
      ["prompt", (i) => rate(i, "prompt")],
    ],
    "chart-ttft": percentiles("ttft"),
    "chart-itl": percentiles("itl"),
    "chart-e2e": percentiles("e2e"),
    "chart-queue": [
      ["running", (i) => history[i].running],
      ["waiting", (i) => history[i].waiting],
    ],
    "chart-kv": [["KV used", (i) => history[i].kv]],
  };

  // ------------------------------------------------------------------ drawing
  function fmt(v, unit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "-";
    if (unit === "s") return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 2 : 1)} ms` : `${v.toFixed(2)} s`;
    if (unit === "%") return `${v.toFixed(v > 0 && v < 1 ? 2 : 1)} %`;
    return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(Number.isInteger(v) ? 0 : 1);
  }

  function draw(figure, series) {
    const unit = figure.dataset.unit;
    const canvas = figure.querySelector("canvas");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 560;
    const h = canvas.clientHeight || 170;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const values = series.map(([, f]) => history.map((_, i) => f(i)));
    const finite = values.flat().filter((v) => v !== null && Number.isFinite(v));
    const top = Math.max(...finite, unit === "%" ? 10 : 1e-9) * 1.15;
    const t1 = history.length ? history[history.length - 1].t : Date.now();
    // the time axis grows with the data, from one minute to KEEP_MS
    const span = Math.min(KEEP_MS, Math.max(60 * 1000, history.length ? t1 - history[0].t : 0));
    const t0 = t1 - span;
    const left = 56;
    const x = (t) => left + ((t - t0) / span) * (w - left - 8);
    const y = (v) => h - 18 - (v / top) * (h - 28);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#5b6675";
    g.strokeStyle = "#e3e6ea";
    g.lineWidth = 1;
    for (let k = 0; k <= 4; k++) {
      const v = (top / 1.15) * (k / 4);
      g.beginPath();
      g.moveTo(left, y(v));
      g.lineTo(w - 8, y(v));
      g.stroke();
      g.fillText(fmt(v, unit), 2, y(v) + 4);
    }
    g.fillText(span >= 120 * 1000 ? `-${Math.round(span / 60000)} min` : `-${Math.round(span / 1000)} s`, left, h - 4);
    g.fillText("now", w - 30, h - 4);
    let points = 0;
    values.forEach((vs, s) => {
      g.strokeStyle = COLORS[s % COLORS.length];
      g.lineWidth = 2;
      g.beginPath();
      let open = false;
      vs.forEach((v, i) => {
        if (v === null || !Number.isFinite(v)) {
          open = false;
          return;
        }
        points += 1;
        const px = x(history[i].t);
        const py = y(v);
        if (open) g.lineTo(px, py);
        else g.moveTo(px, py);
        open = true;
      });
      g.stroke();
    });
    const counts = values.map((vs) => vs.filter((v) => v !== null && Number.isFinite(v)).length);
    figure.dataset.points = String(Math.max(0, ...counts));
    figure.dataset.seriesPoints = counts.join(",");
    const legend = figure.querySelector(".legend");
    legend.replaceChildren(
      ...series.map(([label], s) => {
        const span = document.createElement("span");
        const swatch = document.createElement("i");
        swatch.className = `c${s % COLORS.length}`;
        const last = values[s][values[s].length - 1];
        span.append(swatch, `${label} ${fmt(last, unit)}`);
        return span;
      }),
    );
    return points;
  }

  function tiles() {
    const i = history.length - 1;
    const now = history[i];
    const set = (id, text) => {
      document.getElementById(id).textContent = text;
    };
    set("tile-rps", fmt(rate(i, "finished"), ""));
    set("tile-tps", fmt(rate(i, "generated"), ""));
    set("tile-ttft", fmt(quantile(0.5, now.ttft, null), "s"));
    set("tile-itl", fmt(quantile(0.5, now.itl, null), "s"));
    set("tile-prefix", now.queries > 0 ? fmt((100 * now.hits) / now.queries, "%") : "-");
    set("tile-errors", fmt(now.errors, ""));
    document.getElementById("model").textContent = now.model;
  }

  function render() {
    for (const [id, series] of Object.entries(CHARTS)) draw(document.getElementById(id), series);
    tiles();
  }

  // ------------------------------------------------------------------ the loop
  const status = document.getElementById("status");
  async function poll() {
    try {
      const response = await fetch("metrics", { cache: "no-store" });
      if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
      const t = Date.now();
      history.push(snapshot(parse(await response.text()), t));
      while (history.length > 2 && t - history[0].t > KEEP_MS) history.shift();
      render();
      status.dataset.state = "ok";
      status.dataset.samples = String(history.length);
      status.textContent = `updated ${new Date(t).toLocaleTimeString()} - ${history.length} samples every ${INTERVAL_MS / 1000} s`;
    } catch (e) {
      status.dataset.state = "error";
      status.textContent = `${e.message}; retrying`;
    }
    setTimeout(poll, INTERVAL_MS);
  }
  poll();
})();
