// faasd dashboard. Plain JavaScript, no dependencies: polls the daemon's
// /system/* JSON, draws the charts as inline SVG, invokes through
// POST /system/functions/NAME/invoke.
"use strict";

const POLL_MS = 2000;
const LOG_POLL_MS = 1500;
const LOG_KEEP = 600;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  functions: [],
  activity: null,
  logSeq: 0,
  logStart: null,
  logLines: [],
  token: sessionStorage.getItem("faasd-token") || "",
};

// -- helpers ----------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  // location.origin, not a relative URL: a page opened as http://id:secret@host/ui/
  // (HTTP Basic) cannot fetch URLs resolved against a base that holds credentials.
  const response = await fetch(location.origin + path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401 || response.status === 403) {
    $("auth-bar").hidden = false;
    throw new HttpError(response.status, "this faasd wants a bearer token");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { message: text }; }
  if (!response.ok && !(options.acceptErrors || []).includes(response.status)) {
    throw new HttpError(response.status, (body && body.message) || `HTTP ${response.status}`);
  }
  return { status: response.status, body };
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms === 0) return "0";
  if (ms < 1) return `${(ms * 1000).toFixed(0)} µs`;
  if (ms < 100) return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
  if (ms < 10000) return `${ms.toFixed(0)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

// An axis's label in one unit for the whole axis, chosen by its top: "5 s"
// beside "10 s", never "5000 ms" beside "10.0 s".
function fmtMsAxis(ms, max) {
  if (ms === 0) return "0";
  return max >= 1000 ? `${fmtAxis(ms / 1000)} s` : `${fmtAxis(ms)} ms`;
}

function fmtRate(rate) {
  if (!rate) return "0";
  if (rate < 10) return rate.toFixed(2);
  if (rate < 100) return rate.toFixed(1);
  return rate.toFixed(0);
}

function fmtAxis(v) {
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(3)));
}

function fmtDuration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const d = Math.floor(seconds / 86400), hh = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function fmtClock(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return d.toLocaleTimeString([], { hour12: false });
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== String(text)) el.textContent = text;
}

// -- charts -------------------------------------------------------------------

function niceMax(value) {
  if (!(value > 0)) return 1;
  const exp = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * exp >= value) return step * exp;
  return 10 * exp;
}

// Draws series (arrays of numbers or null, oldest first) as lines and areas.
// format(value, exact, max) labels the axis (exact false; max is its top) and the tooltip.
function drawChart(el, { times, series, format, minMax }) {
  const width = Math.max(el.clientWidth, 200), height = Math.max(el.clientHeight, 120);
  const m = { left: 52, right: 10, top: 10, bottom: 22 };
  const plotW = width - m.left - m.right, plotH = height - m.top - m.bottom;
  const n = times.length;
  let max = minMax || 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const inset = series.some((s) => s.bars) ? plotW / Math.max(n, 1) / 2 : 0;
  const x = (i) => m.left + inset + (n <= 1 ? 0 : i / (n - 1) * (plotW - 2 * inset));
  const y = (v) => m.top + plotH - v / max * plotH;

  el.setAttribute("viewBox", `0 0 ${width} ${height}`);
  el.replaceChildren();
  for (let k = 0; k <= 4; k++) {
    const v = max * k / 4, yy = y(v);
    el.append(svg("line", { class: "grid-line", x1: m.left, x2: width - m.right, y1: yy, y2: yy }));
    el.append(svg("text", { class: "axis-label", x: m.left - 6, y: yy + 3.5, "text-anchor": "end" },
      format(v, false, max)));
  }
  const now = times[n - 1];
  for (const minutes of [15, 10, 5, 0]) {
    const t = now - minutes * 60;
    const i = times.findIndex((tt) => tt >= t);
    if (i < 0) continue;
    el.append(svg("text", {
      class: "axis-label", x: x(i), y: height - 6,
      "text-anchor": minutes === 15 ? "start" : minutes === 0 ? "end" : "middle",
    }, minutes ? `-${minutes}m` : "now"));
  }
  const slot = plotW / Math.max(n, 1);
  for (const s of series) {
    if (s.bars) {
      // One bar per bucket, centred on its point: sparse traffic stays visible.
      const barW = Math.max(1, slot * 0.72);
      s.values.forEach((v, i) => {
        if (!v) return;
        const top = y(v);
        el.append(svg("rect", {
          x: (x(i) - barW / 2).toFixed(1), y: top.toFixed(1), width: barW.toFixed(1),
          height: Math.max(1, y(0) - top).toFixed(1), fill: s.color, rx: Math.min(1.5, barW / 3),
          class: `series series-${s.name}`,
        }));
      });
      continue;
    }
    // Split into runs of non-null points: a gap in latency means no calls.
    const runs = [];
    let run = [];
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { if (run.length) runs.push(run); run = []; }
      else run.push([x(i), y(v)]);
    });
    if (run.length) runs.push(run);
    for (const points of runs) {
      const line = points.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
      if (s.fill && points.length > 1) {
        const base = y(0).toFixed(1);
        el.append(svg("path", {
          d: `${line}L${points[points.length - 1][0].toFixed(1)},${base}L${points[0][0].toFixed(1)},${base}Z`,
          fill: s.color, "fill-opacity": "0.16", stroke: "none",
        }));
      }
      el.append(svg("path", {
        d: line, fill: "none", stroke: s.color, "stroke-width": s.width || 1.8,
        "stroke-linejoin": "round", "stroke-linecap": "round", class: `series series-${s.name}`,
      }));
      if (points.length === 1) {
        el.append(svg("circle", { cx: points[0][0], cy: points[0][1], r: 2.5, fill: s.color }));
      }
    }
  }
  // Hover: a cursor line and the values of the bucket under the pointer.
  const cursor = svg("g", { visibility: "hidden" });
  const cursorLine = svg("line", { class: "cursor", y1: m.top, y2: m.top + plotH });
  const box = svg("rect", { class: "tip-box", rx: 5, width: 150, height: 16 + 15 * series.length });
  const texts = [svg("text", { class: "tip-text" })].concat(series.map(() => svg("text", { class: "tip-text" })));
  cursor.append(cursorLine, box, ...texts);
  el.append(cursor);
  el.onmousemove = (event) => {
    const rect = el.getBoundingClientRect();
    const px = (event.clientX - rect.left) * width / rect.width;
    const i = Math.round((px - m.left - inset) / (plotW - 2 * inset) * (n - 1));
    if (i < 0 || i >= n) { cursor.setAttribute("visibility", "hidden"); return; }
    const cx = x(i), bx = cx + 160 > width ? cx - 158 : cx + 8;
    cursorLine.setAttribute("x1", cx); cursorLine.setAttribute("x2", cx);
    box.setAttribute("x", bx); box.setAttribute("y", m.top);
    texts[0].setAttribute("x", bx + 8); texts[0].setAttribute("y", m.top + 14);
    texts[0].textContent = fmtClock(times[i]);
    series.forEach((s, k) => {
      texts[k + 1].setAttribute("x", bx + 8); texts[k + 1].setAttribute("y", m.top + 29 + 15 * k);
      texts[k + 1].setAttribute("fill", s.color);
      const v = s.values[i];
      texts[k + 1].textContent = `${s.label}: ${v === null || v === undefined ? "–" : format(v, true)}`;
    });
    cursor.setAttribute("visibility", "visible");
  };
  el.onmouseleave = () => cursor.setAttribute("visibility", "hidden");
}

function renderCharts() {
  const a = state.activity;
  if (!a) return;
  const s = a.series;
  const errorRate = s.rate.map((r, i) => (s.invocations[i] ? r * s.errors[i] / s.invocations[i] : 0));
  const rateChart = $("chart-rate");
  drawChart(rateChart, {
    times: s.t, minMax: 1,
    format: (v, exact) => (exact ? `${fmtRate(v)}/s` : fmtAxis(v)),
    series: [
      { name: "rate", label: "invocations", values: s.rate, color: "#2dd4bf", bars: true },
      { name: "errors", label: "errors", values: errorRate, color: "#f87171", bars: true },
    ],
  });
  rateChart.dataset.total = s.invocations.reduce((acc, v) => acc + v, 0);
  const latencyChart = $("chart-latency");
  drawChart(latencyChart, {
    times: s.t, minMax: 1,
    format: (v, exact, max) => (exact ? fmtMs(v) : fmtMsAxis(v, max)),
    series: [
      { name: "p99", label: "p99", values: s.p99_ms, color: "#fbbf24", fill: false },
      { name: "p50", label: "p50", values: s.p50_ms, color: "#60a5fa", fill: true },
    ],
  });
  latencyChart.dataset.points = s.p50_ms.filter((v) => v !== null).length;
  const last = a.last_minute;
  setText("rate-now", `${fmtRate(last.rate)}/s over the last minute`);
  setText("latency-now", last.p50_ms === null ? "no calls in the last minute"
    : `${fmtMs(last.p50_ms)} · ${fmtMs(last.p99_ms)} last minute`);
}

// -- functions ------------------------------------------------------------------

// A trigger's state (/system/functions) in any other status is not delivering events.
const RUNNING = new Set(["starting", "scheduled", "watching", "consuming"]);

function triggerChip(trigger) {
  const t = trigger.type;
  let text = "";
  if (t === "http") text = `${(trigger.methods || ["ANY"]).join(",")} ${trigger.path || ""}`;
  else if (t === "cron") text = `${trigger.schedule || ""}${trigger.timezone ? ` ${trigger.timezone}` : ""}`;
  else if (t === "file") text = `${trigger.dir || ""} ${(trigger.patterns || []).join(" ")}`;
  else if (t === "amqp") text = `${trigger.exchange || ""} ${(trigger.routing_keys || []).join(" ")}`;
  else text = Object.entries(trigger).filter(([k]) => k !== "type").map(([k, v]) => `${k}=${v}`).join(" ");
  const state = trigger.state;
  const down = state && !RUNNING.has(state.status);
  const chip = h("span", { class: `chip chip-${t}${down ? " chip-down" : ""}`, title: JSON.stringify(trigger) },
    h("b", {}, t), text.trim());
  if (!down) return chip;
  const why = state.reason || state.last_error;
  return h("div", {}, chip, h("div", { class: "warn-text" }, why ? `${state.status}: ${why}` : state.status));
}

function workerPills(fn) {
  const counts = fn.worker_counts || {};
  const pills = [];
  for (const name of ["busy", "idle", "frozen", "starting", "retiring"]) {
    if (!counts[name]) continue;
    const pids = (fn.workers || []).filter((w) => w.state === name).map((w) => w.pid).join(", ");
    pills.push(h("span", { class: `state state-${name}`, title: `pids: ${pids}` }, `${counts[name]} ${name}`));
  }
  return pills.length ? pills : [h("span", { class: "muted" }, "none")];
}

function queueCell(name) {
  const a = state.activity;
  if (!a || !a.queue_running) return h("span", { class: "muted" }, "–");
  const q = (a.queue || {})[name] || {};
  // depth counts every event not done yet, the running ones included.
  const running = q.running || 0;
  const parts = [h("span", {}, `${Math.max(0, (q.depth || 0) - running)} queued`)];
  if (running) parts.push(h("div", { class: "fn-meta" }, `${running} running`));
  if (q.depth) parts.push(h("div", { class: "fn-meta" }, `oldest ${fmtDuration(q.oldest_age_s || 0)}`));
  if (q.dead_lettered) parts.push(h("div", { class: "err-text" }, `${q.dead_lettered} dead-lettered`));
  return parts;
}

function functionRow(fn) {
  const triggers = [h("span", { class: "chip chip-http", title: "always routed" }, h("b", {}, "http"), `/function/${fn.name}`)]
    .concat((fn.triggers || []).map(triggerChip));
  let status;
  if (fn.load_error) {
    status = [h("span", { class: "pill pill-bad" }, "load error"), h("div", { class: "err-text" }, fn.load_error)];
  } else if (fn.init_error) {
    status = [h("span", { class: "pill pill-warn" }, "init failing"),
      h("div", { class: "warn-text" }, `${fn.init_error.errorType}: ${fn.init_error.errorMessage}`)];
  } else {
    status = h("span", { class: "pill pill-ok" }, "ready");
  }
  const limit = fn.concurrency != null ? ` / ${fn.concurrency}` : "";
  return h("tr", { "data-function": fn.name },
    h("td", {},
      h("div", { class: "fn-name" }, fn.name),
      h("div", { class: "fn-meta" }, `${fn.runtime} · ${fn.handler} · ${fn.memory_mb}\u00a0MB · ${fn.timeout_s}\u00a0s`)),
    h("td", { class: "triggers" }, triggers),
    h("td", {}, workerPills(fn)),
    h("td", { class: "num" }, `${fn.inflight || 0}${limit}`),
    h("td", {}, queueCell(fn.name)),
    h("td", { class: "status" }, status),
    h("td", {}, h("button", { class: "small", type: "button", onclick: () => pickFunction(fn.name) }, "Invoke")));
}

// What a row is drawn from: the function's view less the seconds its workers
// have been in their state, which change at every poll and are not shown.
function rowKey(fn) {
  const a = state.activity;
  const queue = a && a.queue_running ? (a.queue || {})[fn.name] || {} : null;
  return JSON.stringify([fn, queue], (key, value) => (key === "state_for_s" ? undefined : value));
}

// Rows drawn so far, by function name: a poll redraws only the functions that
// changed. Redrawing all of some two hundred every two seconds froze the page
// for a tenth of a second each time and lost any text selected in the table.
let drawnRows = new Map();

// The functions whose name holds the filter box's text (any case): with some
// two hundred, the whole table is many screens tall.
function shownFunctions() {
  const filter = $("functions-filter").value.trim().toLowerCase();
  return filter ? state.functions.filter((fn) => fn.name.toLowerCase().includes(filter)) : state.functions;
}

function renderFunctions() {
  const body = $("functions-table").querySelector("tbody");
  const drawn = new Map();
  const shown = shownFunctions();
  const rows = shown.map((fn) => {
    const key = rowKey(fn);
    const before = drawnRows.get(fn.name);
    const row = before && before.key === key ? before.row : functionRow(fn);
    drawn.set(fn.name, { key, row });
    return row;
  });
  drawnRows = drawn;
  const total = state.functions.length;
  if (!rows.length) {
    rows.push(h("tr", {}, h("td", { colspan: 7, class: "empty" }, total
      ? "No function's name holds this text."
      : "No functions yet: drop a handler file into the functions directory.")));
  }
  if (rows.length !== body.children.length || rows.some((row, i) => body.children[i] !== row)) {
    body.replaceChildren(...rows);
  }
  const broken = state.functions.filter((fn) => fn.load_error).length;
  const count = shown.length === total ? `${total}` : `${shown.length} of ${total}`;
  setText("functions-summary",
    `${count} function${total === 1 ? "" : "s"}${broken ? `, ${broken} failing to load` : ""}`);

  const select = $("invoke-function");
  const current = select.value;
  const names = state.functions.map((fn) => fn.name);
  if (names.join() !== Array.from(select.options).map((o) => o.value).join()) {
    select.replaceChildren(...names.map((name) => h("option", { value: name }, name)));
    if (names.includes(current)) select.value = current;
  }
}

function pickFunction(name) {
  $("invoke-function").value = name;
  $("invoke-card").scrollIntoView({ behavior: "smooth", block: "center" });
  $("invoke-payload").focus();
}

// -- errors and header -------------------------------------------------------------

function renderErrors() {
  const errors = (state.activity && state.activity.recent_errors) || [];
  const body = $("errors-table").querySelector("tbody");
  body.replaceChildren(...errors.map((e) => h("tr", {},
    h("td", { class: "mono" }, fmtClock(e.time)),
    h("td", {}, e.function, h("div", { class: "fn-meta" }, e.trigger)),
    h("td", {}, h("div", {}, e.error_type), h("div", { class: "err-text" }, e.message)),
    h("td", {}, e.request_id
      ? h("span", { class: "rid", title: "show its log lines", onclick: () => filterLog(e.request_id) },
        e.request_id.slice(0, 8))
      : h("span", { class: "muted" }, "–")))));
  $("errors-empty").hidden = errors.length > 0;
  setText("errors-summary", errors.length ? `last ${errors.length}` : "");
}

function renderHeader(info, ready) {
  setText("version", info ? `v${info.version}` : "");
  if (info) {
    setText("stat-inflight", info.inflight);
    setText("stat-uptime", fmtDuration(info.uptime_s));
  }
  setText("stat-functions", state.functions.length);
  const pill = $("ready");
  if (ready) {
    const failing = Object.entries(ready.checks || {}).filter(([, c]) => !c.ok);
    pill.className = `pill ${ready.ready ? "pill-ok" : "pill-bad"}`;
    pill.textContent = ready.ready ? "ready" : `not ready: ${failing.map(([k]) => k).join(", ")}`;
    pill.title = Object.entries(ready.checks || {}).map(([k, c]) => `${k}: ${c.detail}`).join("\n");
  }
  const a = state.activity;
  if (a) {
    const last = a.last_minute;
    setText("stat-rate", fmtRate(last.rate));
    setText("stat-latency", last.p50_ms === null ? "–" : `${fmtMs(last.p50_ms)} · ${fmtMs(last.p99_ms)}`);
    setText("stat-errors", last.errors);
    $("stat-errors").className = last.errors ? "bad" : "";
  }
}

// -- log tail ------------------------------------------------------------------------

function logMatches(line, filter) {
  if (!filter) return true;
  const f = filter.toLowerCase();
  return [line.message, line.function, line.request_id, line.logger]
    .some((v) => v && String(v).toLowerCase().includes(f));
}

// Lambda's START/END/REPORT lines, or their JSON records (log_format = "JSON").
const PLATFORM_LINE = /^((REPORT|START|END) RequestId|\{"time":"[^"]*","type":"platform\.)/;

function logRow(line) {
  const classes = ["log-line"];
  if (PLATFORM_LINE.test(line.message)) classes.push("report");
  if (line.level === "error" || line.level === "critical") classes.push("error");
  const time = new Date(line.time * 1000).toLocaleTimeString([], { hour12: false });
  return h("div", { class: classes.join(" ") },
    h("span", { class: "t" }, time),
    h("span", { class: `lvl lvl-${line.level}` }, line.level.toUpperCase()),
    h("span", { class: "src" }, line.function ? `[${line.function}]` : line.logger),
    h("span", { class: "msg" }, line.message));
}

function renderLog(full) {
  const box = $("log-tail");
  const filter = $("log-filter").value.trim();
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
  if (full) box.replaceChildren(...state.logLines.filter((l) => logMatches(l, filter)).map(logRow));
  else return;
  if ($("log-follow").checked || atBottom) box.scrollTop = box.scrollHeight;
}

function appendLog(lines) {
  if (!lines.length) return;
  const box = $("log-tail");
  const filter = $("log-filter").value.trim();
  state.logLines.push(...lines);
  if (state.logLines.length > LOG_KEEP) state.logLines.splice(0, state.logLines.length - LOG_KEEP);
  box.append(...lines.filter((l) => logMatches(l, filter)).map(logRow));
  while (box.childElementCount > LOG_KEEP) box.firstElementChild.remove();
  if ($("log-follow").checked) box.scrollTop = box.scrollHeight;
}

function filterLog(text) {
  $("log-filter").value = text;
  renderLog(true);
  $("log-tail").scrollIntoView({ behavior: "smooth", block: "center" });
}

// -- invoke form ------------------------------------------------------------------------

async function invoke(event) {
  event.preventDefault();
  const name = $("invoke-function").value;
  const type = $("invoke-type").value;
  const payload = $("invoke-payload").value.trim() || "{}";
  const status = $("invoke-status"), meta = $("invoke-meta"), output = $("invoke-output");
  const logBox = $("invoke-log");
  $("invoke-result").hidden = false;
  try {
    JSON.parse(payload);
  } catch (e) {
    status.className = "pill pill-warn";
    status.textContent = "invalid JSON";
    meta.textContent = "";
    output.textContent = e.message;
    logBox.textContent = "";
    return;
  }
  const button = $("invoke-submit");
  button.disabled = true;
  status.className = "pill pill-unknown";
  status.textContent = "running…";
  meta.textContent = name;
  output.textContent = "";
  logBox.textContent = "";
  const started = performance.now();
  try {
    const { status: code, body } = await api(
      `/system/functions/${encodeURIComponent(name)}/invoke${type === "Event" ? "?type=Event" : ""}`,
      { method: "POST", body: payload, headers: { "Content-Type": "application/json" },
        // Refusals, each with its message: 408 is a body that stalled on its way.
        acceptErrors: [400, 404, 408, 413, 429, 503] });
    if (code >= 400) {
      status.className = "pill pill-warn";
      status.textContent = code === 429 ? "throttled" : `refused (${code})`;
      output.textContent = body.message;
    } else if (body.queued) {
      status.className = "pill pill-ok";
      status.textContent = "queued";
      meta.textContent = `${name} · request ${body.requestId}`;
      output.textContent = "The event is stored; it runs as capacity allows. Its log lines appear below.";
    } else {
      status.className = `pill ${body.ok ? "pill-ok" : "pill-bad"}`;
      status.textContent = body.ok ? "succeeded" : `failed: ${body.error.errorType}`;
      const bits = [name, `duration ${fmtMs(body.durationMs)}`];
      if (body.initMs !== null) bits.push(`cold start, init ${fmtMs(body.initMs)}`);
      // None when no worker ran the handler (a function that cannot load).
      if (body.maxMemoryUsedMb) bits.push(`max memory ${body.maxMemoryUsedMb} MB`);
      bits.push(`request ${body.requestId}`);
      meta.textContent = bits.join(" · ");
      if (body.ok) {
        output.textContent = typeof body.result === "string" ? body.result : JSON.stringify(body.result, null, 2);
      } else {
        // As the Lambda console shows a failure: type and message, then the trace.
        const e = body.error;
        const trace = (e.stackTrace || []).map((line) => line.replace(/\n$/, "")).join("\n");
        output.textContent = `${e.errorType}: ${e.errorMessage}${trace ? `\n\n${trace}` : ""}`;
      }
      logBox.textContent = body.logTail || "";
    }
  } catch (e) {
    status.className = "pill pill-bad";
    status.textContent = "request failed";
    output.textContent = `${e.message} after ${fmtMs(performance.now() - started)}`;
  } finally {
    button.disabled = false;
    refresh();
  }
}

// -- polling ----------------------------------------------------------------------------

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const [functions, info, ready, activity] = await Promise.all([
      api("/system/functions"),
      api("/system/info"),
      api("/readyz", { acceptErrors: [503] }),
      api("/system/activity"),
    ]);
    state.functions = functions.body.functions || [];
    state.activity = activity.body;
    renderFunctions();
    renderCharts();
    renderErrors();
    renderHeader(info.body, ready.body);
    $("conn-bar").hidden = true;
    $("auth-bar").hidden = true;
  } catch (e) {
    if (!(e instanceof HttpError && (e.status === 401 || e.status === 403))) {
      $("conn-bar").hidden = false;
      $("conn-bar").textContent = `Cannot reach faasd: ${e.message}. Retrying…`;
      const pill = $("ready");
      pill.className = "pill pill-unknown";
      pill.textContent = "unreachable";
    }
  } finally {
    refreshing = false;
  }
}

async function pollLog() {
  try {
    let { body } = await api(`/system/log?after=${state.logSeq}`);
    if (state.logStart !== null && body.start !== state.logStart) {
      // Another daemon's start (a restart): its lines are numbered from 1
      // again, and the tail starts over with them.
      ({ body } = await api("/system/log?after=0"));
      state.logLines = [];
      $("log-tail").replaceChildren();
    }
    state.logStart = body.start;
    state.logSeq = body.last;
    appendLog(body.lines);
  } catch (e) {
    // refresh() reports connection problems
  }
}

function main() {
  $("invoke-form").addEventListener("submit", invoke);
  $("log-filter").addEventListener("input", () => renderLog(true));
  $("functions-filter").addEventListener("input", renderFunctions);
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("auth-token").value.trim();
    sessionStorage.setItem("faasd-token", state.token);
    refresh();
    pollLog();
  });
  window.addEventListener("resize", renderCharts);
  refresh();
  pollLog();
  setInterval(refresh, POLL_MS);
  setInterval(pollLog, LOG_POLL_MS);
}

document.addEventListener("DOMContentLoaded", main);
