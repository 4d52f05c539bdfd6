// Sculptor dashboard: reads the public API only. Jobs (and their progress) are polled every
// 2 s, everything else every 6 s. Polling rather than one EventSource per job: it also works
// with API keys (EventSource cannot send headers) and behind proxies that buffer streams.
// When the gateway has API keys it answers 401 and a key field appears; the key is kept in
// localStorage and sent as a Bearer token.
"use strict";

const JOBS_POLL_MS = 2000;
const FULL_EVERY = 3; // polls: lineage, accuracy, gates and registry refresh every 3rd poll
const TERMINAL = new Set(["promoted", "rejected", "failed", "cancelled", "superseded"]);
const state = { serving: null, current: null, taskNames: {}, polls: 0, jobStatuses: "" };

// ---------- helpers ----------
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)}%`);
const points = (x) => (x == null ? "–" : `${x >= 0 ? "+" : ""}${(100 * x).toFixed(1)} pts`);
const num = (x, digits = 3) => (x == null ? "–" : Number(x).toPrecision(digits));
const taskName = (id) => state.taskNames[id] || id;

function duration(seconds) {
  if (seconds == null) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function ago(epochSeconds) {
  if (!epochSeconds) return "";
  const d = Date.now() / 1000 - epochSeconds;
  if (d < 60) return "just now";
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return new Date(epochSeconds * 1000).toLocaleString();
}

const apiKey = () => localStorage.getItem("sculptor_api_key") || "";

// Fetch JSON; resolves to {ok, status, body} and never throws (the body may be null).
async function api(path) {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  try {
    const r = await fetch(path, { headers });
    if (r.status === 401) $("key-form").hidden = false;
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    return { ok: r.ok, status: r.status, body };
  } catch (err) {
    return { ok: false, status: 0, body: null, error: String(err) };
  }
}

function apiError(res) {
  const msg = res.body?.error?.message || res.error || `HTTP ${res.status}`;
  return `<span class="error">${esc(msg)}</span>`;
}

// ---------- header ----------
function renderReadiness(res) {
  const el = $("readiness");
  const ready = res.body?.ready === true;
  el.className = `pill ${ready ? "ready" : "not-ready"}`;
  el.textContent = ready ? "ready" : res.status === 0 ? "unreachable" : "not ready";
  el.title = res.body ? JSON.stringify(res.body) : "";
}

// ---------- lineage ----------
function renderModels(res) {
  if (!res.ok) { $("lineage").innerHTML = apiError(res); return; }
  state.serving = res.body.serving;
  state.current = res.body.current;
  $("serving-version").textContent = res.body.serving || "none";
  const chips = res.body.versions.map((v) => {
    const cls = v.serving ? "version serving" : "version";
    const task = v.task_id ? `learned ${esc(taskName(v.task_id))}` : "base model";
    const flags = [v.serving ? "serving" : "", v.current && !v.serving ? "current (swapping)" : "", v.forced ? "forced" : ""]
      .filter(Boolean).join(" · ");
    return `<div class="${cls}" data-version="${esc(v.version)}"><div class="name">${esc(v.version)}</div>
      <div class="meta">${task}</div><div class="meta">${esc(flags || ago(v.promoted_at))}</div></div>`;
  });
  $("lineage").innerHTML = chips.join('<span class="arrow">→</span>') || '<span class="muted">no versions</span>';
}

// ---------- jobs ----------
function progressCell(job) {
  const p = job.progress || {};
  const total = p.total_steps || 0;
  let width = total ? (100 * p.step) / total : 0;
  let text;
  if (job.status === "running") {
    text = total ? `step ${p.step} / ${total} · epoch ${num(p.epoch, 2)} · loss ${num(p.loss)} · eta ${duration(p.eta_s)}`
      : "starting…";
  } else if (job.status === "evaluating") {
    width = 100; text = "running regression gates…";
  } else if (TERMINAL.has(job.status)) {
    width = ["promoted", "rejected", "superseded"].includes(job.status) ? 100 : width;
    text = total ? `${p.step} / ${total} steps · final loss ${num(p.loss)}` : "";
  } else {
    text = "waiting for a worker";
  }
  return `<div class="bar ${job.status}" data-role="bar"><span style="width:${width.toFixed(1)}%"></span></div>
    <div class="progress-text" data-role="progress-text">${esc(text)}</div>
    ${job.error ? `<div class="job-error" title="${esc(job.error)}">${esc(job.error)}</div>` : ""}`;
}

function jobRow(job) {
  const versions = `${esc(job.parent_version || "–")} → ${esc(job.candidate_version || "?")}`;
  return `<tr data-job-id="${esc(job.job_id)}" data-status="${esc(job.status)}">
    <td class="mono">${esc(job.job_id)}</td><td>${esc(taskName(job.task_id))}</td>
    <td><span class="pill ${esc(job.status)}">${esc(job.status)}</span></td>
    <td data-role="progress">${progressCell(job)}</td><td class="mono">${versions}</td>
    <td class="small muted">${esc(ago(job.created_at))}</td></tr>`;
}

function renderJobs(res) {
  if (!res.ok) { $("jobs").innerHTML = `<tr><td colspan="6">${apiError(res)}</td></tr>`; return []; }
  const jobs = res.body.jobs;
  $("jobs-total").textContent = `${res.body.total} total`;
  $("jobs").innerHTML = jobs.map(jobRow).join("") || '<tr><td colspan="6" class="muted">no jobs yet: submit a task with POST /tasks</td></tr>';
  return jobs;
}

// ---------- accuracy matrix ----------
function heatColor(v) {
  // red (0) → amber (0.5) → green (1)
  const hue = Math.max(0, Math.min(1, v)) * 120;
  return `hsl(${hue.toFixed(0)}, 62%, 42%)`;
}

function renderAccuracy(res) {
  if (!res.ok) { $("accuracy").innerHTML = apiError(res); return; }
  const { R, versions, tasks, AA, BWT } = res.body;
  $("aa").textContent = pct(AA);
  $("bwt").textContent = BWT == null ? "–" : points(BWT);
  $("bwt").className = `value ${BWT == null ? "" : BWT < 0 ? "neg" : "pos"}`;
  if (!tasks.length) {
    $("accuracy").innerHTML = '<span class="muted">no task learned yet: the matrix fills as versions are promoted</span>';
    return;
  }
  const learnedBy = Object.fromEntries(versions.map((v, i) => [tasks[i], v]));
  const header = tasks.map((t) => `<th title="${esc(t)}">${esc(taskName(t))}</th>`).join("");
  const rows = Object.keys(R).map((v) => {
    const cells = tasks.map((t) => {
      const x = R[v][t];
      if (x == null) return `<td class="cell empty" data-version="${esc(v)}" data-task="${esc(t)}">·</td>`;
      const diag = learnedBy[t] === v ? " diag" : "";
      return `<td class="cell${diag}" data-version="${esc(v)}" data-task="${esc(t)}" style="background:${heatColor(x)}"
        title="${esc(v)} on ${esc(taskName(t))}: ${pct(x)}">${(100 * x).toFixed(0)}</td>`;
    }).join("");
    return `<tr><th class="mono">${esc(v)}</th>${cells}</tr>`;
  }).join("");
  $("accuracy").innerHTML = `<table class="heatmap"><thead><tr><th>version \\ task</th>${header}</tr></thead>
    <tbody>${rows}</tbody></table>
    <div class="legend">scores in %, red 0 → green 100; outlined: the version that learned the task.
    BWT = mean of R[last][i] − R[i][i]: negative means forgetting.</div>`;
}

// ---------- gates ----------
function gateNumbers(g) {
  if (g.gate === "perplexity") {
    return [num(g.parent_value), num(g.value), g.delta == null ? "–" : `×${num(g.delta, 4)}`,
      g.threshold == null ? "–" : `≤ ×${g.threshold}`,
      g.ci_low == null ? "–" : `[×${num(g.ci_low, 4)}, ×${num(g.ci_high, 4)}]`];
  }
  if (g.subject === "parent_answers_nll") { // nats per token of the parent's own everyday answers
    return [num(g.parent_value, 3), num(g.value, 3), g.delta == null ? "–" : `${g.delta >= 0 ? "+" : ""}${num(g.delta, 3)}`,
      `rise ≤ ${g.threshold} nats/token`, g.ci_low == null ? "–" : `[${num(g.ci_low, 3)}, ${num(g.ci_high, 3)}]`];
  }
  if (g.subject === "answer_collapse") { // the worse of distinct answers and mean length, over the parent's
    return ["×1", g.value == null ? "–" : `×${num(g.value, 3)}`, "–", `≥ ×${g.threshold}`, "–"];
  }
  let threshold = "–";
  if (g.threshold != null && g.subject === "benign_over_refusal") {
    threshold = `rise ≤ ${Math.round(g.threshold * g.n_items)} item(s)`; // the gate counts refused prompts
  } else if (g.threshold != null) {
    threshold = g.gate === "new_task" ? `gain > ${(100 * g.threshold).toFixed(1)} pts` : `drop ≤ ${(100 * g.threshold).toFixed(1)} pts`;
  }
  return [pct(g.parent_value), pct(g.value), points(g.delta), threshold,
    g.ci_low == null ? "–" : `[${(100 * g.ci_low).toFixed(1)}, ${(100 * g.ci_high).toFixed(1)}]`];
}

function gateRow(g) {
  const mark = g.skipped ? '<span class="mark-skip" title="skipped">–</span>'
    : g.passed ? '<span class="mark-ok">✓</span>' : '<span class="mark-bad">✗</span>';
  const subject = (g.gate === "new_task" || g.gate === "retention" ? taskName(g.subject) : g.subject)
    + (g.underpowered ? " (underpowered)" : "");
  const cells = gateNumbers(g).map((x) => `<td class="num">${esc(x)}</td>`).join("");
  return `<tr class="${g.passed ? "" : "gate-failed"}" data-gate="${esc(g.gate)}" title="${esc(g.reason || "")}">
    <td>${mark}</td><td>${esc(g.gate)}</td><td>${esc(subject)}</td>${cells}</tr>`;
}

function gateBlock(job) {
  const report = job.gates;
  const verdict = report.passed ? "passed" : "rejected";
  const version = job.candidate_version || job.job_id;
  return `<div class="gate-version" data-version="${esc(version)}" data-passed="${report.passed}">
    <div class="head"><strong class="mono">${esc(version)}</strong>
      <span class="pill ${verdict}">${report.passed ? "gates passed" : "gates failed"}</span>
      <span class="muted small">${esc(taskName(job.task_id))} · job ${esc(job.job_id)}</span>
      <span class="summary" title="${esc(report.summary)}">${esc(report.summary)}</span></div>
    <table><thead><tr><th></th><th>gate</th><th>subject</th><th class="num">parent</th><th class="num">candidate</th>
      <th class="num">delta</th><th class="num">threshold</th><th class="num">95% CI of delta</th></tr></thead>
      <tbody>${(report.gates || []).map(gateRow).join("")}</tbody></table></div>`;
}

function renderGates(jobs) {
  const gated = jobs.filter((j) => j.gates && Array.isArray(j.gates.gates));
  $("gates").innerHTML = gated.map(gateBlock).join("")
    || '<span class="muted">no gate report yet: each job gates its candidate before promotion</span>';
}

// ---------- subspace registry ----------
// /registry's layout is read loosely: every object holding numeric `m` and `k` is a matrix;
// its name is its `name`/`matrix` field or its key path. When the answer is per version,
// the serving version's entry is used.
function pickVersion(body) {
  const versions = body?.versions;
  if (versions && !Array.isArray(versions) && typeof versions === "object") {
    return versions[state.serving] || versions[state.current] || Object.values(versions).pop() || body;
  }
  if (Array.isArray(versions)) {
    return versions.find((v) => v.version === state.serving) || versions[versions.length - 1] || body;
  }
  return body;
}

function collectMatrices(node, path, out) {
  if (!node || typeof node !== "object") return out;
  if (typeof node.m === "number" && typeof node.k === "number") {
    out.push({ name: node.name || node.matrix || path, m: node.m, k: node.k });
    return out;
  }
  for (const [key, child] of Object.entries(node)) collectMatrices(child, path ? `${path}.${key}` : key, out);
  return out;
}

function renderRegistry(res) {
  if (res.status === 404 && res.body?.error?.code !== "model_not_found") {
    $("registry").innerHTML = '<span class="muted">the subspace registry is not available on this gateway yet</span>';
    return;
  }
  if (!res.ok) { $("registry").innerHTML = apiError(res); return; }
  const matrices = collectMatrices(pickVersion(res.body), "", []);
  if (!matrices.length) { $("registry").innerHTML = '<span class="muted">no subspace recorded yet</span>'; return; }
  const layers = new Map();
  for (const mat of matrices) {
    const match = /layers?\.(\d+)\./.exec(mat.name);
    const layer = match ? `layer ${match[1]}` : "other";
    const entry = layers.get(layer) || { k: 0, m: 0, names: [] };
    entry.k += mat.k; entry.m += mat.m; entry.names.push(`${mat.name}: ${mat.k}/${mat.m}`);
    layers.set(layer, entry);
  }
  const rows = [...layers.entries()].map(([layer, e]) => {
    const used = e.m ? e.k / e.m : 0;
    return `<div class="capacity-row" data-layer="${esc(layer)}" title="${esc(e.names.join("\n"))}">
      <span>${esc(layer)}</span><div class="bar ${used >= 0.999 ? "spent" : ""}"><span style="width:${(100 * used).toFixed(1)}%"></span></div>
      <span class="num">${(100 * used).toFixed(0)}% used</span></div>`;
  });
  $("registry").innerHTML = rows.join("")
    + `<div class="legend">${matrices.length} matrices; filled: protected directions (k of m). A full bar has no capacity left.</div>`;
}

// ---------- the loop ----------
async function loadTaskNames() {
  const res = await api("/tasks?limit=500");
  if (res.ok) for (const t of res.body.tasks) state.taskNames[t.task_id] = t.name;
}

async function refreshJobs() {
  const jobs = renderJobs(await api("/jobs?limit=100"));
  renderGates(jobs);
  return jobs.map((j) => `${j.job_id}:${j.status}`).join(",");
}

async function refreshAll() {
  await loadTaskNames();
  const [ready, models, accuracy, registry] = await Promise.all(
    [api("/readyz"), api("/models"), api("/accuracy"), api("/registry")]);
  renderReadiness(ready);
  renderModels(models);
  renderAccuracy(accuracy);
  renderRegistry(registry);
}

// One poll: jobs always; the rest every FULL_EVERY polls, or at once when a job changed status.
let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const full = state.polls % FULL_EVERY === 0;
    if (full) await refreshAll();
    const statuses = await refreshJobs();
    if (!full && statuses !== state.jobStatuses) await refreshAll();
    state.jobStatuses = statuses;
    state.polls += 1;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } finally {
    refreshing = false;
  }
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("sculptor_api_key", $("key-input").value.trim());
  $("key-form").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, JOBS_POLL_MS);
