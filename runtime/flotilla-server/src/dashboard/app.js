// Flotilla dashboard: plain JavaScript, no framework, no build step.
//
// - The management token is asked for once (only when the runner wants one),
//   kept in sessionStorage (this tab, this session) and sent in the
//   Authorization header of fetch(); it is never put in a URL.
// - The DOM is built with createElement/textContent only (never parsed from
//   strings), so nothing the runner returns (node ids, reasons, policy text)
//   is ever markup.
// - A task is live through GET /v1/tasks/{id}/live, server-sent events read
//   with fetch() and a ReadableStream (EventSource cannot send headers).
"use strict";

const TOKEN_KEY = "flotilla.token";
const PAGE = 200;
const MAX_EVENT_ROWS = 1000;

// Colours of run states in the grid and legends; each is also named in text.
const STATE_COLOURS = {
  "pending": [200, 200, 200], "skipped": [214, 200, 240], "queued": [150, 150, 150],
  "offered": [144, 202, 249], "downloading": [100, 181, 246], "upgrading": [30, 136, 229],
  "verifying": [13, 71, 161], "succeeded": [46, 125, 50], "failed-rolled-back": [230, 81, 0],
  "failed-rollback-failed": [183, 28, 28], "timed-out": [123, 31, 162], "unknown": [109, 76, 65],
  "rejected": [194, 24, 91], "rolling-back": [253, 216, 53], "rolled-back": [249, 168, 37],
  "cancelled": [66, 66, 66],
};
const FAILED = new Set(["failed-rolled-back", "failed-rollback-failed", "timed-out", "unknown", "rejected"]);
const IN_FLIGHT = new Set(["offered", "downloading", "upgrading", "verifying", "rolling-back"]);
const TASK_STATES = ["scheduled", "running", "paused", "succeeded", "failed", "cancelled", "rolling-back", "rolled-back"];
const ACTIONS = [
  { name: "pause", label: "Pause", text: "Pause this task? Nothing new starts; nodes already working finish." },
  { name: "resume", label: "Resume", text: "Resume this task?" },
  { name: "promote", label: "Promote", text: "Promote: start the wave waiting for approval?" },
  { name: "cancel", label: "Cancel", text: "Cancel this task? Waiting nodes are left as they are.", danger: true },
  { name: "rollback", label: "Roll back", text: "Roll back: put the previous release back on every node this task upgraded?", danger: true },
];

let me = null;          // {name, role} of the token in use
let current = null;     // the open view's cleanup (stops streams and timers)

// ----- small DOM helpers -----

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function $(id) { return document.getElementById(id); }

// replaceChildren without the nulls of conditional children.
function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function when(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function clock(ms) {
  return new Date(ms).toISOString().slice(11, 19);
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function stateName(state) {
  return state && typeof state === "object" ? state.state : String(state || "");
}

function badge(state) {
  const name = stateName(state);
  const reason = state && state.reason ? state.reason : null;
  return h("span", { class: "badge " + name, title: reason || name }, name + (reason ? ": " + reason : ""));
}

let sayTimer = 0;
function say(text) {
  $("status").textContent = text;
  clearTimeout(sayTimer);
  sayTimer = setTimeout(() => { $("status").textContent = ""; }, 8000);
}

function table(headers, rows, opts) {
  const o = opts || {};
  return h("div", { class: "table-wrap" },
    h("table", { id: o.id },
      o.caption ? h("caption", { class: "muted", text: o.caption }) : null,
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", class: t.cls }, t.text || t)))),
      h("tbody", {}, rows)));
}

function swatch(state) {
  const c = STATE_COLOURS[state] || [153, 153, 153];
  const s = h("span", { class: "swatch", "aria-hidden": "true" });
  s.style.background = `rgb(${c[0]},${c[1]},${c[2]})`;
  return s;
}

// ----- the API -----

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : "HTTP " + status);
    this.status = status;
    this.hint = body && body.hint;
  }
}

function authHeaders() {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? { "Authorization": "Bearer " + t } : {};
}

async function api(method, path, body, raw) {
  const init = { method, headers: authHeaders(), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    const why = (await res.json().catch(() => ({}))).error || "401";
    // No token yet: just ask; a token that stopped working: say why.
    await signIn(init.headers["Authorization"] ? "The runner refused the token: " + why : "");
    return api(method, path, body, raw);
  }
  if (!res.ok) {
    throw new ApiError(res.status, await res.json().catch(() => null));
  }
  if (raw) return res;
  return res.json();
}

function showError(where, e) {
  put(where, h("p", { class: "error", role: "alert" },
    e.message, e.hint ? h("span", { class: "muted" }, " — " + e.hint) : null));
}

// ----- signing in -----

let signingIn = null;

function signIn(message) {
  if (signingIn) return signingIn;
  sessionStorage.removeItem(TOKEN_KEY);
  const dlg = $("login");
  $("login-error").textContent = message || "";
  $("login-token").value = "";
  signingIn = new Promise((resolve) => {
    $("login-form").onsubmit = async (ev) => {
      ev.preventDefault();
      const token = $("login-token").value.trim();
      if (!token) return;
      const res = await fetch("/v1/whoami", { headers: { "Authorization": "Bearer " + token }, cache: "no-store" });
      if (!res.ok) {
        const b = await res.json().catch(() => ({}));
        $("login-error").textContent = b.error || ("HTTP " + res.status);
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      me = await res.json();
      showWho();
      dlg.close();
      signingIn = null;
      resolve();
    };
  });
  dlg.addEventListener("cancel", (ev) => ev.preventDefault());
  if (!dlg.open) dlg.showModal();
  $("login-token").focus();
  return signingIn;
}

function showWho() {
  $("who").textContent = me ? `${me.name} (${me.role})` : "not signed in";
}

async function whoami() {
  me = await api("GET", "/v1/whoami");
  showWho();
}

function canOperate() { return me && (me.role === "operate" || me.role === "admin"); }

// ----- confirming an action -----

function confirmAction(title, text) {
  const dlg = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-reason").value = "";
  $("confirm-error").textContent = "";
  return new Promise((resolve) => {
    const done = (v) => { dlg.close(); resolve(v); };
    $("confirm-form").onsubmit = (ev) => {
      ev.preventDefault();
      const reason = $("confirm-reason").value.trim();
      if (!reason) { $("confirm-error").textContent = "Say why: the reason is kept with the task."; return; }
      done(reason);
    };
    $("confirm-cancel").onclick = () => done(null);
    dlg.oncancel = (ev) => { ev.preventDefault(); done(null); };
    dlg.showModal();
    $("confirm-reason").focus();
  });
}

// ----- routing -----

function route() {
  const hash = location.hash.replace(/^#/, "") || "/tasks";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  return { parts, params };
}

function setHash(parts, params) {
  const q = params && params.toString();
  const next = "#/" + parts.map(encodeURIComponent).join("/") + (q ? "?" + q : "");
  if (location.hash !== next) history.replaceState(null, "", next);
}

async function render() {
  if (current) { current(); current = null; }
  const main = $("main");
  const { parts, params } = route();
  for (const a of document.querySelectorAll(".top nav a")) {
    const on = a.getAttribute("href") === "#/" + (parts[0] || "tasks");
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  main.replaceChildren();
  delete main.dataset.rendered;
  $("status").textContent = "";
  try {
    if (!me) await whoami();
    switch (parts[0] || "tasks") {
      case "tasks": parts[1] ? await taskView(main, parts[1]) : await tasksView(main, params); break;
      case "nodes": parts[1] ? await nodeView(main, parts[1]) : await nodesView(main, params); break;
      case "releases": await releasesView(main); break;
      case "policies": parts[1] ? await policyView(main, parts[1]) : await policiesView(main); break;
      case "plan": await planView(main); break;
      default: main.append(h("h1", { text: "Not found" }), h("p", {}, h("a", { href: "#/tasks", text: "Tasks" })));
    }
  } catch (e) {
    showError(main, e);
  }
}

// ----- tasks -----

async function tasksView(main, params) {
  const state = params.get("state") || "";
  const select = h("select", { id: "task-state" },
    h("option", { value: "", text: "any" }),
    TASK_STATES.map((s) => h("option", { value: s, text: s, selected: s === state })));
  select.addEventListener("change", () => {
    const p = new URLSearchParams();
    if (select.value) p.set("state", select.value);
    location.hash = "#/tasks" + (p.toString() ? "?" + p : "");
  });
  const body = h("div", {});
  main.append(h("h1", { text: "Tasks" }),
    h("div", { class: "filters" }, h("div", {}, h("label", { for: "task-state", text: "State" }), select)),
    body);
  const load = async () => {
    const q = state ? "?state=" + encodeURIComponent(state) : "";
    const tasks = await api("GET", "/v1/tasks" + q);
    tasks.sort((a, b) => b.created_at - a.created_at);
    const rows = tasks.map((t) => {
      const c = t.counts || {};
      const total = Object.values(c).reduce((a, b) => a + b, 0);
      const ok = c["succeeded"] || 0;
      const failed = Object.entries(c).filter(([k]) => FAILED.has(k)).reduce((a, [, v]) => a + v, 0);
      const progress = t.counts
        ? h("span", {}, h("progress", { max: total || 1, value: ok, "aria-label": `${ok} of ${total} succeeded` }),
            ` ${ok}/${total} succeeded` + (failed ? `, ${failed} failed` : ""))
        : h("span", {}, `wave ${Math.min(t.current_wave + 1, t.waves)} of ${t.waves}`);
      return h("tr", { dataset: { task: t.id } },
        h("td", {}, h("a", { href: "#/tasks/" + encodeURIComponent(t.id), text: t.name || t.id }),
          h("div", { class: "muted mono", text: t.id })),
        h("td", {}, badge(t.state), t.awaiting_approval ? h("div", { class: "muted", text: "awaiting approval" }) : null),
        h("td", {}, t.package, " → ", t.target_version || "—"),
        h("td", {}, progress),
        h("td", { class: "hide-narrow" }, when(t.created_at)),
        h("td", {}, ago(t.updated_at)));
    });
    body.replaceChildren(rows.length
      ? table(["Task", "State", "Package → target", "Progress", { text: "Created", cls: "hide-narrow" }, "Updated"], rows, { id: "tasks" })
      : h("p", { class: "muted", text: state ? `No ${state} tasks.` : "No tasks yet." }));
    main.dataset.rendered = "1";
  };
  await load();
  const timer = setInterval(() => load().catch((e) => say(e.message)), 5000);
  current = () => clearInterval(timer);
}

// ----- a task -----

async function* sse(path, signal) {
  const res = await fetch(path, { headers: authHeaders(), signal, cache: "no-store", credentials: "omit" });
  if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = "message"; const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
    if (buf.length > 16 << 20) throw new Error("the live stream sent an oversized event");
  }
}

async function taskView(main, id) {
  const t0 = performance.now();
  const ctl = new AbortController();
  let stopped = false;
  current = () => { stopped = true; ctl.abort(); hideTip(); };

  const title = h("h1", {}, "Task ", h("span", { class: "mono", text: id }));
  const stateEl = h("span", { id: "task-state" });
  const summary = h("dl", { class: "summary" });
  const controls = h("div", { class: "controls", role: "group", "aria-label": "Task actions" });
  const waves = h("section", { "aria-labelledby": "waves-h" }, h("h2", { id: "waves-h", text: "Waves" }));
  const wavesBody = h("div", { id: "waves" });
  waves.append(wavesBody);
  const canvas = h("canvas", { class: "grid", id: "grid", tabindex: "0", role: "img",
    "aria-label": "One cell per node, coloured by its run state; move with the arrow keys, Enter opens the node" });
  const legend = h("ul", { class: "legend", id: "legend", "aria-label": "Legend and counts" });
  const counts = h("div", { id: "counts" });
  const cellInfo = h("p", { id: "cell-info", class: "muted", "aria-live": "polite", text: "Point at or focus a cell to see its node." });
  const gridSec = h("section", { "aria-labelledby": "grid-h" },
    h("h2", { id: "grid-h", text: "Nodes" }), h("div", { class: "grid-box" }, canvas), cellInfo, legend);
  const evFilter = h("input", { type: "checkbox", id: "ev-policy" });
  const evBody = h("tbody", {});
  const evSec = h("section", { "aria-labelledby": "events-h" },
    h("h2", { id: "events-h", text: "Events" }),
    h("div", { class: "filters" }, h("div", {}, h("span", {}, evFilter, " ", h("label", { for: "ev-policy", text: "Only policy decisions and task changes" })))),
    h("div", { class: "events table-wrap" }, h("table", { id: "events" },
      h("thead", {}, h("tr", {}, ["#", "At (UTC)", "Kind", "Node", "Detail", "Policy"].map((t) => h("th", { scope: "col", class: t === "Policy" ? "hide-narrow" : null, text: t })))),
      evBody)));
  main.append(title, h("p", {}, stateEl), summary, controls, waves,
    gridSec, h("section", { "aria-labelledby": "counts-h" }, h("h2", { id: "counts-h", text: "Counts" }), counts),
    evSec);

  let task = null;
  let grid = null;        // Uint8Array of state codes
  let states = [];        // code -> name
  let nodes = null;       // {nodes, waves, plan_rev}
  let gridBusy = false, gridAgain = false;
  let layout = null;      // {size, cols, rows}
  let cursor = -1;

  const buttons = ACTIONS.map((a) => {
    const b = h("button", { type: "button", id: "btn-" + a.name, class: a.danger ? "danger" : null, text: a.label });
    b.addEventListener("click", async () => {
      const reason = await confirmAction(a.label + " task " + (task ? task.spec.name : id), a.text);
      if (reason === null) return;
      try {
        await api("POST", `/v1/tasks/${encodeURIComponent(id)}/${a.name}`, { reason });
        say(`${a.label}: done`);
      } catch (e) {
        say(`${a.label} refused: ${e.message}`);
      }
    });
    controls.append(b);
    return [a.name, b];
  });

  function updateButtons() {
    const s = task ? stateName(task.state) : "";
    const allowed = {
      pause: s === "running" || s === "scheduled",
      resume: s === "paused",
      promote: !!(task && task.awaiting_approval) && (s === "running" || s === "paused"),
      cancel: ["scheduled", "running", "paused"].includes(s),
      rollback: ["running", "paused", "succeeded", "failed"].includes(s),
    };
    for (const [name, b] of buttons) {
      if (!canOperate()) {
        b.disabled = true;
        b.title = `Your token (${me ? me.role : "none"}) may look, not act: an operate token is needed`;
      } else {
        b.disabled = !allowed[name];
        b.title = allowed[name] ? "" : `Not possible while the task is ${s}`;
      }
    }
  }

  function drawTask() {
    title.replaceChildren("Task ", h("span", { text: task.spec.name }), " ", h("span", { class: "muted mono", text: task.id }));
    put(stateEl, badge(task.state),
      task.awaiting_approval ? h("span", { class: "badge", text: "awaiting approval" }) : null,
      task.soak_until ? h("span", { class: "muted", text: ` soaking until ${when(task.soak_until)}` }) : null);
    summary.replaceChildren(
      h("dt", { text: "Package" }), h("dd", {}, task.spec.package, " → ", task.target_version || JSON.stringify(task.spec.target)),
      h("dt", { text: "Policy" }), h("dd", {}, h("a", { href: "#/policies/" + encodeURIComponent(task.spec.policy), text: task.spec.policy }),
        " ", h("span", { class: "mono muted", title: "SHA-256 of the policy bytes this task runs", text: task.policy_sha256 ? "sha256 " + task.policy_sha256 : "" })),
      h("dt", { text: "Created" }), h("dd", { text: when(task.created_at) }),
      h("dt", { text: "Updated" }), h("dd", { id: "task-updated", text: when(task.updated_at) }),
      h("dt", { text: "Wave" }), h("dd", { text: task.waves.length ? `${Math.min(task.current_wave + 1, task.waves.length)} of ${task.waves.length}` : "not planned yet" }));
    const c = task.counts || {};
    const total = Object.values(c).reduce((a, b) => a + b, 0);
    counts.replaceChildren(table([{ text: "State" }, { text: "Nodes", cls: "num" }, { text: "Share", cls: "num" }],
      Object.keys(STATE_COLOURS).filter((s) => c[s]).map((s) => h("tr", { dataset: { state: s } },
        h("td", {}, swatch(s), h("a", { href: `#/nodes?task=${encodeURIComponent(task.id)}&state=${encodeURIComponent(s)}`, title: `The nodes ${s} in this task`, text: s })),
        h("td", { class: "num", text: c[s] }),
        h("td", { class: "num", text: total ? (100 * c[s] / total).toFixed(1) + " %" : "" }))),
      { id: "counts-table", caption: `${total} nodes` }));
    drawWaves();
    updateButtons();
  }

  function waveCounts() {
    const n = task.waves.length;
    const per = Array.from({ length: n }, () => ({ done: 0, failed: 0, flight: 0, other: 0, by: {} }));
    if (!grid || !nodes || nodes.waves.length !== grid.length) return null;
    for (let i = 0; i < grid.length; i++) {
      const w = nodes.waves[i];
      if (w === null || w >= n) continue;
      const s = states[grid[i]];
      const p = per[w];
      p.by[s] = (p.by[s] || 0) + 1;
      if (s === "succeeded") p.done++;
      else if (FAILED.has(s)) p.failed++;
      else if (IN_FLIGHT.has(s)) p.flight++;
      else p.other++;
    }
    return per;
  }

  function drawWaves() {
    if (!task.waves.length) { wavesBody.replaceChildren(h("p", { class: "muted", text: "The policy has not planned waves yet." })); return; }
    const per = waveCounts();
    wavesBody.replaceChildren(...task.waves.map((w, i) => {
      const size = w.size != null ? w.size : (w.nodes || []).length;
      const p = per ? per[i] : null;
      const mark = i < task.current_wave ? "done" : i === task.current_wave ? "current" : "to come";
      const bar = h("div", { class: "bar", "aria-hidden": "true" });
      let text = `${size} nodes`;
      if (p) {
        for (const [k, cls] of [["done", "seg-done"], ["failed", "seg-failed"], ["flight", "seg-flight"], ["other", "seg-other"]]) {
          const seg = h("span", { class: cls });
          seg.style.width = (size ? 100 * p[k] / size : 0) + "%";
          bar.append(seg);
        }
        text = Object.entries(p.by).sort().map(([s, v]) => `${v} ${s}`).join(", ") || `${size} nodes`;
      }
      return h("div", { class: "wave", dataset: { wave: i } },
        h("div", { class: "wave-head" },
          h("strong", {}, `Wave ${i + 1}: ${w.name}`, " ", h("span", { class: "muted", text: `(${mark}${w.needs_approval ? ", needs approval" : ""}${w.soak_seconds ? `, soak ${w.soak_seconds} s` : ""})` })),
          h("span", { class: "wave-counts", text: p ? `${p.done}/${size} succeeded` + (p.failed ? `, ${p.failed} failed` : "") + (p.flight ? `, ${p.flight} in flight` : "") : "" })),
        bar, h("div", { class: "muted", text }));
    }));
  }

  function drawGrid() {
    if (!grid) return;
    const n = grid.length;
    const width = Math.max(200, Math.min(canvas.parentElement.clientWidth - 10, 1400));
    let size = Math.floor(Math.sqrt(width * 480 / Math.max(n, 1)));
    size = Math.max(1, Math.min(size, 28));
    const cols = Math.max(1, Math.floor(width / size));
    const rows = Math.max(1, Math.ceil(n / cols));
    layout = { size, cols, rows };
    canvas.width = cols * size;
    canvas.height = rows * size;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, canvas.height);
    const px = img.data;
    const gap = size >= 6 ? 1 : 0;
    const colours = states.map((s) => STATE_COLOURS[s] || [153, 153, 153]);
    const W = canvas.width;
    for (let i = 0; i < n; i++) {
      const c = colours[grid[i]] || [153, 153, 153];
      const x0 = (i % cols) * size, y0 = Math.floor(i / cols) * size;
      for (let y = y0; y < y0 + size - gap; y++) {
        let o = (y * W + x0) * 4;
        for (let x = 0; x < size - gap; x++, o += 4) {
          px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; px[o + 3] = 255;
        }
      }
    }
    ctx.putImageData(img, 0, 0);
    if (cursor >= 0 && cursor < n) {
      ctx.strokeStyle = "#f0a000"; ctx.lineWidth = 2;
      ctx.strokeRect((cursor % cols) * size, Math.floor(cursor / cols) * size, Math.max(size, 4), Math.max(size, 4));
    }
    // The legend names every state present, with its count: colour is never the only signal.
    const count = new Array(states.length).fill(0);
    for (let i = 0; i < n; i++) count[grid[i]]++;
    put(legend, ...states.map((s, i) => count[i]
      ? h("li", { dataset: { state: s } }, swatch(s), `${s}: ${count[i]}`) : null).filter(Boolean));
    canvas.setAttribute("aria-label", `${n} nodes: ` + states.map((s, i) => count[i] ? `${count[i]} ${s}` : null).filter(Boolean).join(", ")
      + ". Arrow keys move between nodes; Enter opens one.");
  }

  function cellAt(ev) {
    if (!layout || !grid) return -1;
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * canvas.width / r.width;
    const y = (ev.clientY - r.top) * canvas.height / r.height;
    const i = Math.floor(y / layout.size) * layout.cols + Math.floor(x / layout.size);
    return x >= 0 && i >= 0 && i < grid.length && Math.floor(x / layout.size) < layout.cols ? i : -1;
  }

  function describe(i) {
    const id = nodes && nodes.nodes[i] !== undefined ? nodes.nodes[i] : `#${i + 1}`;
    const w = nodes && nodes.waves[i] !== null && nodes.waves[i] !== undefined ? `, wave ${nodes.waves[i] + 1}` : "";
    return `${id}: ${states[grid[i]]}${w} (cell ${i + 1} of ${grid.length})`;
  }

  canvas.addEventListener("mousemove", (ev) => {
    const i = cellAt(ev);
    if (i < 0) { hideTip(); return; }
    showTip(ev.clientX, ev.clientY, describe(i));
  });
  canvas.addEventListener("mouseleave", hideTip);
  canvas.addEventListener("click", (ev) => {
    const i = cellAt(ev);
    if (i >= 0) { cursor = i; cellInfo.textContent = describe(i); drawGrid(); }
  });
  canvas.addEventListener("dblclick", (ev) => {
    const i = cellAt(ev);
    if (i >= 0 && nodes) location.hash = "#/nodes/" + encodeURIComponent(nodes.nodes[i]);
  });
  canvas.addEventListener("keydown", (ev) => {
    if (!grid || !layout) return;
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: layout.cols, ArrowUp: -layout.cols, Home: -Infinity, End: Infinity };
    if (ev.key in moves) {
      ev.preventDefault();
      const m = moves[ev.key];
      cursor = m === -Infinity ? 0 : m === Infinity ? grid.length - 1 : Math.min(grid.length - 1, Math.max(0, (cursor < 0 ? 0 : cursor) + m));
      cellInfo.textContent = describe(cursor);
      drawGrid();
    } else if (ev.key === "Enter" && cursor >= 0 && nodes) {
      location.hash = "#/nodes/" + encodeURIComponent(nodes.nodes[cursor]);
    }
  });

  async function loadGrid() {
    if (gridBusy) { gridAgain = true; return; }
    gridBusy = true;
    try {
      do {
        gridAgain = false;
        const res = await api("GET", `/v1/tasks/${encodeURIComponent(id)}/grid`, undefined, true);
        states = (res.headers.get("x-flotilla-states") || "").split(",");
        grid = new Uint8Array(await res.arrayBuffer());
        if (!nodes || nodes.nodes.length !== grid.length || nodes.plan_rev !== task.plan_rev) {
          nodes = await api("GET", `/v1/tasks/${encodeURIComponent(id)}/grid/nodes`);
        }
        if (stopped) return;
        drawGrid();
        drawWaves();
        if (!main.dataset.rendered) {
          main.dataset.renderMs = String(Math.round(performance.now() - t0));
          main.dataset.rendered = "1";
        }
      } while (gridAgain && !stopped);
    } finally {
      gridBusy = false;
    }
  }

  // Every decision (policy., task., wave. events) stays on the page, up to
  // MAX_EVENT_ROWS of them; of the node events, the newest MAX_EVENT_ROWS.
  const policyKinds = /^(policy\.|task\.|wave\.)/;
  let decisionRows = 0, nodeRows = 0;
  function addEvents(list) {
    const only = evFilter.checked;
    // Newest first, into one fragment; of a long batch's node events only
    // the newest MAX_EVENT_ROWS (the ones that would stay) are made.
    const frag = document.createDocumentFragment();
    let nodeSeen = 0;
    for (let k = list.length - 1; k >= 0; k--) {
      const e = list[k];
      const decision = policyKinds.test(e.kind);
      if (!decision && ++nodeSeen > MAX_EVENT_ROWS) continue;
      const row = h("tr", { dataset: { kind: e.kind, seq: e.seq }, class: decision ? "decision" : "node-event" },
        h("td", { class: "num", text: e.seq }), h("td", {}, h("time", { datetime: new Date(e.at).toISOString(), title: when(e.at), text: clock(e.at) })),
        h("td", {}, h("code", { class: "kind", text: e.kind })),
        h("td", { class: "mono", text: e.node || "" }), h("td", { text: e.detail }),
        h("td", { class: "mono muted hide-narrow", title: e.policy_sha256 || "", text: e.policy_sha256 ? e.policy_sha256.slice(0, 12) : "" }));
      if (only && !decision) row.hidden = true;
      frag.append(row);
      if (decision) decisionRows++; else nodeRows++;
    }
    evBody.prepend(frag);
    for (const [cls, over] of [["node-event", nodeRows - MAX_EVENT_ROWS], ["decision", decisionRows - MAX_EVENT_ROWS]]) {
      if (over <= 0) continue;
      const old = evBody.querySelectorAll("tr." + cls);
      for (let k = old.length - over; k < old.length; k++) old[k].remove();
      if (cls === "node-event") nodeRows -= over; else decisionRows -= over;
    }
  }
  // Messages that arrive together are drawn as one batch, after the first
  // draw of the grid when it is on its way.
  let pendingEvents = [], flushTimer = 0;
  function queueEvents(list) {
    pendingEvents.push(...list);
    if (flushTimer) return;
    flushTimer = setTimeout(() => {
      flushTimer = 0;
      const batch = pendingEvents;
      pendingEvents = [];
      if (!stopped) addEvents(batch);
    }, main.dataset.rendered ? 50 : 300);
  }
  evFilter.addEventListener("change", () => {
    for (const r of evBody.children) r.hidden = evFilter.checked && !policyKinds.test(r.dataset.kind);
  });

  let from = 0;
  async function stream() {
    for (let attempt = 0; !stopped; attempt++) {
      try {
        for await (const m of sse(`/v1/tasks/${encodeURIComponent(id)}/live?from=${from}`, ctl.signal)) {
          attempt = 0;
          if (m.event === "task") {
            task = JSON.parse(m.data);
            drawTask();
            loadGrid().catch((e) => say("grid: " + e.message));
          } else if (m.event === "events") {
            const list = JSON.parse(m.data);
            if (list.length) from = list[list.length - 1].seq + 1;
            queueEvents(list);
          } else if (m.event === "error") {
            say(JSON.parse(m.data).error);
          }
        }
        // The stream ended: for a task that changes no more, stop.
        if (task && !["scheduled", "running", "paused", "rolling-back"].includes(stateName(task.state)) && !task.draining) return;
      } catch (e) {
        if (stopped) return;
        if (e.status === 404 || e.status === 403) { showError(main, e); return; }
        if (e.status === 401) { await signIn("The runner refused the token"); continue; }
        say("live updates interrupted: " + e.message + "; retrying");
      }
      // Bounded back-off between reconnects.
      await new Promise((r) => setTimeout(r, Math.min(30000, 500 * 2 ** Math.min(attempt, 6))));
    }
  }
  const onResize = () => drawGrid();
  window.addEventListener("resize", onResize);
  const prev = current;
  current = () => { prev(); window.removeEventListener("resize", onResize); };
  stream();
}

const tip = () => $("tooltip");
function showTip(x, y, text) {
  const t = tip();
  t.textContent = text;
  t.hidden = false;
  t.style.left = Math.min(x + 12, window.innerWidth - 260) + "px";
  t.style.top = (y + 14) + "px";
}
function hideTip() { tip().hidden = true; }

// ----- nodes -----

const RUN_STATES = Object.keys(STATE_COLOURS).concat(["failed"]);

// The nodes of a task in one run state (`failed`: every failed state).
async function taskNodesView(main, params) {
  const id = params.get("task");
  const state = params.get("state") || "failed";
  const select = h("select", { id: "run-state" }, RUN_STATES.map((s) => h("option", { value: s, selected: s === state, text: s === "failed" ? "failed (any kind)" : s })));
  select.addEventListener("change", () => {
    location.hash = "#/nodes?" + new URLSearchParams({ task: id, state: select.value });
  });
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  main.append(h("h1", {}, "Nodes of task ", h("a", { href: "#/tasks/" + encodeURIComponent(id), text: id })),
    h("div", { class: "filters" }, h("div", {}, h("label", { for: "run-state", text: "Run state" }), select)));
  const q = new URLSearchParams({ state, offset, limit: PAGE });
  const page = await api("GET", `/v1/tasks/${encodeURIComponent(id)}/runs?${q}`);
  const rows = page.items.map((r) => h("tr", { dataset: { node: r.node_id } },
    h("td", {}, h("a", { href: "#/nodes/" + encodeURIComponent(r.node_id), class: "mono", text: r.node_id })),
    h("td", {}, swatch(r.state.state), r.state.state,
      r.state.error || r.state.reason || r.state.detail ? h("div", { class: "muted", text: r.state.error || r.state.reason || r.state.detail }) : null),
    h("td", { class: "num", text: r.state.wave != null ? r.state.wave + 1 : "—" }),
    h("td", { class: "num", text: r.attempts }),
    h("td", { text: r.from_version }),
    h("td", { text: when(r.updated_at) })));
  main.append(h("p", {}, `${page.total} nodes ${state}`, page.total > PAGE ? `, showing ${offset + 1}–${offset + page.items.length} ` : "",
      offset > 0 ? h("a", { href: "#/nodes?" + withParam(params, "offset", Math.max(0, offset - PAGE)), text: "previous" }) : null, " ",
      offset + PAGE < page.total ? h("a", { href: "#/nodes?" + withParam(params, "offset", offset + PAGE), text: "next" }) : null),
    rows.length ? table(["Node", "Run state", { text: "Wave", cls: "num" }, { text: "Attempts", cls: "num" }, "From", "Updated"], rows, { id: "runs" })
      : h("p", { class: "muted", text: "None." }));
  main.dataset.rendered = "1";
}

async function nodesView(main, params) {
  if (params.get("task")) return taskNodesView(main, params);
  const fields = [
    { name: "label", label: "Label (key=value, comma-separated)", placeholder: "region=eu" },
    { name: "version", label: "Version", placeholder: "1.4.0" },
  ];
  const inputs = {};
  const form = h("form", { class: "filters", id: "node-filters" });
  for (const f of fields) {
    inputs[f.name] = h("input", { id: "f-" + f.name, name: f.name, value: params.get(f.name) || "", placeholder: f.placeholder });
    form.append(h("div", {}, h("label", { for: "f-" + f.name, text: f.label }), inputs[f.name]));
  }
  for (const [name, label, opts] of [["online", "Online", ["", "true", "false"]], ["healthy", "Health", ["", "true", "false"]]]) {
    inputs[name] = h("select", { id: "f-" + name, name },
      opts.map((o) => h("option", { value: o, selected: (params.get(name) || "") === o,
        text: o === "" ? "any" : name === "online" ? (o === "true" ? "online" : "offline") : (o === "true" ? "healthy" : "unhealthy") })));
    form.append(h("div", {}, h("label", { for: "f-" + name, text: label }), inputs[name]));
  }
  form.append(h("div", {}, h("button", { type: "submit", text: "Filter" })));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const [k, el] of Object.entries(inputs)) if (el.value.trim()) p.set(k, el.value.trim());
    location.hash = "#/nodes" + (p.toString() ? "?" + p : "");
  });
  const body = h("div", {});
  main.append(h("h1", { text: "Nodes" }), form, body);
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  const q = new URLSearchParams();
  for (const k of ["label", "version", "online", "healthy"]) if (params.get(k)) q.set(k, params.get(k));
  q.set("offset", offset); q.set("limit", PAGE);
  const page = await api("GET", "/v1/nodes?" + q);
  const rows = page.items.map((n) => h("tr", { dataset: { node: n.id } },
    h("td", {}, h("a", { href: "#/nodes/" + encodeURIComponent(n.id), class: "mono", text: n.id })),
    h("td", { text: n.version || "—" }),
    h("td", { text: n.online ? "online" : "offline" }),
    h("td", { text: n.healthy ? "healthy" : "unhealthy" }),
    h("td", { class: "hide-narrow" }, n.labels.map(([k, v]) => h("code", { text: `${k}=${v} ` }))),
    h("td", { text: ago(n.last_seen) })));
  const pager = h("p", {}, `${page.total} nodes`, page.total > PAGE ? `, showing ${offset + 1}–${offset + page.items.length} ` : "",
    offset > 0 ? h("a", { href: "#/nodes?" + withParam(params, "offset", Math.max(0, offset - PAGE)), text: "previous" }) : null, " ",
    offset + PAGE < page.total ? h("a", { href: "#/nodes?" + withParam(params, "offset", offset + PAGE), text: "next" }) : null);
  body.replaceChildren(pager, table(["Node", "Version", "Online", "Health", { text: "Labels", cls: "hide-narrow" }, "Last seen"], rows, { id: "nodes" }));
  main.dataset.rendered = "1";
}

function withParam(params, k, v) {
  const p = new URLSearchParams(params);
  p.set(k, v);
  return p.toString();
}

async function nodeView(main, id) {
  const enc = encodeURIComponent(id);
  main.append(h("h1", {}, "Node ", h("span", { class: "mono", text: id })));
  try {
    const n = await api("GET", "/v1/nodes/" + enc);
    main.append(h("dl", { class: "summary" },
      h("dt", { text: "Version" }), h("dd", { text: n.version || "—" }),
      h("dt", { text: "Online" }), h("dd", { text: n.online ? "online" : "offline" }),
      h("dt", { text: "Health" }), h("dd", { text: n.healthy ? "healthy" : "unhealthy" }),
      h("dt", { text: "Schedulable" }), h("dd", { text: n.schedulable ? "yes" : "no" }),
      h("dt", { text: "Last seen" }), h("dd", { text: `${when(n.last_seen)} (${ago(n.last_seen)})` }),
      h("dt", { text: "Labels" }), h("dd", {}, n.labels.map(([k, v]) => h("code", { text: `${k}=${v} ` }))),
      h("dt", { text: "Attributes" }), h("dd", {}, n.attributes.map(([k, v]) => h("code", { text: `${k}=${v} ` })))));
  } catch (e) {
    if (e.status !== 404) throw e;
    main.append(h("p", { class: "muted", text: "Not in the inventory any more." }));
  }
  const hist = await api("GET", `/v1/nodes/${enc}/history?limit=100`);
  main.append(h("h2", { text: "History across tasks" }), hist.items.length
    ? table(["Task", "Package → target", "Task state", "Run state", "Attempts", "From", "Updated"], hist.items.map((x) => h("tr", {},
      h("td", {}, h("a", { href: "#/tasks/" + encodeURIComponent(x.task), text: x.name || x.task })),
      h("td", {}, x.package, " → ", x.target_version || "—"),
      h("td", {}, badge(x.task_state)),
      h("td", {}, swatch(x.run.state.state), x.run.state.state,
        x.run.state.error || x.run.state.reason || x.run.state.detail ? h("div", { class: "muted", text: x.run.state.error || x.run.state.reason || x.run.state.detail }) : null),
      h("td", { class: "num", text: x.run.attempts }),
      h("td", { text: x.run.from_version }),
      h("td", { text: when(x.run.updated_at) }))), { id: "history" })
    : h("p", { class: "muted", text: "No task has run on this node." }));
  main.dataset.rendered = "1";
}

// ----- releases and policies -----

async function releasesView(main) {
  const rels = await api("GET", "/v1/releases");
  rels.sort((a, b) => a.package.localeCompare(b.package) || b.created_at - a.created_at);
  main.append(h("h1", { text: "Releases" }), rels.length ? table(
    ["Package", "Version", "Kind", "Artifact", "Size", "Signature", "Added"],
    rels.map((r) => h("tr", {},
      h("td", { text: r.package }), h("td", { text: r.version }), h("td", { text: r.kind || "" }),
      h("td", {}, r.url ? h("span", { class: "mono", text: r.url }) : r.sha256 ? h("span", { class: "mono", title: r.sha256, text: "sha256 " + r.sha256.slice(0, 16) + "…" }) : h("span", { class: "error", text: "no artifact yet" })),
      h("td", { class: "num", text: r.size ? (r.size / 1048576).toFixed(2) + " MiB" : "—" }),
      h("td", { text: r.signature ? "signed" : "unsigned" }),
      h("td", { text: when(r.created_at) }))), { id: "releases" })
    : h("p", { class: "muted", text: "No releases yet." }));
  main.dataset.rendered = "1";
}

async function policiesView(main) {
  const list = await api("GET", "/v1/policies");
  main.append(h("h1", { text: "Policies" }), table(["Policy", "Kind", "Hooks implemented", "SHA-256", "Size"],
    list.map((p) => h("tr", {},
      h("td", {}, h("a", { href: "#/policies/" + encodeURIComponent(p.name), text: p.name }), p.builtin ? h("span", { class: "muted", text: " (built in)" }) : null),
      h("td", { text: p.kind || (p.error ? "error" : "") }),
      h("td", {}, p.error ? h("span", { class: "error", text: p.error }) : (p.info.hooks || []).join(", ")),
      h("td", { class: "mono", title: p.sha256 || "", text: p.sha256 ? p.sha256.slice(0, 16) + "…" : "" }),
      h("td", { class: "num", text: p.size != null ? p.size + " B" : "" }))), { id: "policies" }));
  main.dataset.rendered = "1";
}

async function policyView(main, name) {
  const enc = encodeURIComponent(name);
  const [p, src] = await Promise.all([api("GET", "/v1/policies/" + enc), api("GET", `/v1/policies/${enc}/source`)]);
  main.append(h("h1", {}, "Policy ", h("span", { text: name })),
    h("dl", { class: "summary" },
      h("dt", { text: "Kind" }), h("dd", { text: p.kind + (p.builtin ? " (built in)" : "") }),
      h("dt", { text: "Declares" }), h("dd", { text: `${p.info.name} ${p.info.version}` }),
      h("dt", { text: "Hooks" }), h("dd", { text: (p.info.hooks || []).join(", ") || "none" }),
      h("dt", { text: "SHA-256" }), h("dd", { class: "mono", text: p.sha256 }),
      h("dt", { text: "Size" }), h("dd", { text: p.size + " bytes" })),
    h("h2", { text: "Source" }),
    src.source !== null
      ? h("pre", { class: "source", id: "policy-source", tabindex: "0" }, h("code", { text: src.source }))
      : h("p", { class: "muted", text: "A WebAssembly component: its source is not kept by the runner (see the policy's repository)." }));
  main.dataset.rendered = "1";
}

// ----- plan preview -----

const EXAMPLE_SPEC = {
  name: "edge-1-4-0", package: "edge", target: { version: "1.4.0" }, policy: "canary",
  selector: {}, node_timeout_seconds: 600,
};

async function planView(main) {
  const text = h("textarea", { id: "plan-spec", spellcheck: "false", "aria-describedby": "plan-help" });
  text.value = sessionStorage.getItem("flotilla.plan") || JSON.stringify(EXAMPLE_SPEC, null, 2);
  const file = h("input", { type: "file", id: "plan-file", accept: ".json,application/json" });
  file.addEventListener("change", async () => {
    const f = file.files[0];
    if (!f) return;
    if (f.size > 1 << 20) { say("That file is over 1 MiB: not a task spec."); return; }
    text.value = await f.text();
  });
  const run = h("button", { type: "button", id: "plan-run", text: "Preview the plan" });
  const out = h("div", { id: "plan-out" });
  main.append(h("h1", { text: "Plan preview" }),
    h("p", { id: "plan-help" }, "Paste or upload a task spec (JSON, as ", h("code", { text: "POST /v1/tasks" }),
      " takes it; a YAML spec of the CLI: ", h("code", { text: "flotilla task create FILE --dry-run" }),
      "). The runner simulates it on the current inventory with every agent succeeding, on a virtual clock; nothing starts and no agent hears of it."),
    h("div", { class: "filters" }, h("div", {}, h("label", { for: "plan-file", text: "Upload a spec" }), file)),
    h("label", { for: "plan-spec", text: "Task spec" }), text,
    h("div", { class: "controls" }, run), out);
  if (!canOperate()) {
    run.disabled = true;
    run.title = "A dry run needs an operate token";
    out.append(h("p", { class: "muted", text: `Your token (${me ? me.role : "none"}) may not run a dry run: it needs the operate role.` }));
  }
  run.addEventListener("click", async () => {
    sessionStorage.setItem("flotilla.plan", text.value.slice(0, 1 << 20));
    let spec;
    try { spec = JSON.parse(text.value); } catch (e) { showError(out, new Error("Not JSON: " + e.message)); return; }
    out.replaceChildren(h("p", { class: "muted", text: "Simulating…" }));
    try {
      const r = await api("POST", "/v1/tasks?dry_run=true", spec);
      drawPlan(out, r);
    } catch (e) { showError(out, e); }
  });
  main.dataset.rendered = "1";
}

function fmtDur(ms) {
  const s = Math.round(ms / 1000);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function drawPlan(out, r) {
  const ev = r.events || [];
  const t0 = ev.length ? ev[0].at : 0;
  const tEnd = ev.length ? ev[ev.length - 1].at : 0;
  const span = Math.max(1, tEnd - t0);
  const waves = r.waves || [];
  // Each wave's start, soak start and verdict, from the simulated events.
  const lanes = waves.map((w, i) => ({ name: w.name, size: w.nodes.length, start: null, soak: null, verdict: null, verdictText: "" }));
  const defers = [];
  for (const e of ev) {
    const m = /^wave (\d+)/.exec(e.detail || "");
    const i = m ? parseInt(m[1], 10) - 1 : -1;
    if (e.kind === "wave.start" && lanes[i]) lanes[i].start = e.at;
    if (e.kind === "wave.soak" && lanes[i]) lanes[i].soak = e.at;
    if (e.kind === "policy.verdict" && lanes[i]) { lanes[i].verdict = e.at; lanes[i].verdictText = e.detail.replace(/^wave \d+: /, ""); }
    if (e.kind === "policy.admit") defers.push(e);
    // The first wave starts with the plan (no wave.start of its own).
    if (e.kind === "policy.plan" && lanes[0] && lanes[0].start === null) lanes[0].start = e.at;
  }
  // Waiting for the first window: from creation until the task runs.
  const created = ev.find((e) => e.kind === "task.created");
  const running = ev.find((e) => e.kind === "task.running");
  const waitedFirst = created && running && running.at > created.at ? [created.at, running.at] : null;
  const W = 1000, left = 170, right = 20, laneH = 34, top = 30;
  // Lanes: the task (windows waited), each wave, deferred admissions.
  const H = top + (Math.max(1, lanes.length) + 2) * laneH + 40;
  const x = (t) => left + (W - left - right) * (t - t0) / span;
  const NS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  };
  const svg = s("svg", { class: "timeline", id: "plan-timeline", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `Simulated timeline: ${lanes.length} waves over ${fmtDur(span)}, ending ${stateName(r.final_state)}` });
  svg.append(s("title", {}, "Simulated rollout timeline"));
  for (let k = 0; k <= 4; k++) {
    const t = t0 + span * k / 4;
    svg.append(s("line", { x1: x(t), x2: x(t), y1: top - 8, y2: H - 30, stroke: "#d0d7de" }),
      s("text", { x: x(t), y: H - 14, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle" }, "+" + fmtDur(t - t0)));
  }
  {
    const y = top;
    svg.append(s("text", { x: 4, y: y + 18 }, "Task"));
    if (waitedFirst) {
      svg.append(s("rect", { x: x(waitedFirst[0]), y: y + 6, width: Math.max(2, x(waitedFirst[1]) - x(waitedFirst[0])), height: 16, fill: "#e0e0e0", stroke: "#757575", "stroke-dasharray": "4 2" }),
        s("text", { x: x(waitedFirst[0]) + 4, y: y + 18 }, "waits for its window: " + fmtDur(waitedFirst[1] - waitedFirst[0])));
    } else {
      svg.append(s("text", { x: left, y: y + 18, fill: "#57606a" }, "starts at once (no window to wait for)"));
    }
  }
  {
    const y = top + (lanes.length + 1) * laneH;
    svg.append(s("text", { x: 4, y: y + 18 }, "Deferred admissions"));
    for (const d of defers.slice(0, 500)) {
      svg.append(s("line", { x1: x(d.at), x2: x(d.at), y1: y + 4, y2: y + 24, stroke: "#f9a825", "stroke-width": 2 }));
    }
    if (!defers.length) svg.append(s("text", { x: left, y: y + 18, fill: "#57606a" }, "none"));
  }
  lanes.forEach((l, i) => {
    const y = top + (i + 1) * laneH;
    svg.append(s("text", { x: 4, y: y + 18 }, `Wave ${i + 1}: ${l.name} (${l.size})`));
    if (l.start !== null) {
      const runEnd = l.soak !== null ? l.soak : l.verdict !== null ? l.verdict : tEnd;
      svg.append(s("rect", { x: x(l.start), y: y + 6, width: Math.max(2, x(runEnd) - x(l.start)), height: 16, fill: "#1e88e5" }));
      if (l.soak !== null) {
        const soakEnd = l.verdict !== null ? l.verdict : tEnd;
        svg.append(s("rect", { x: x(l.soak), y: y + 6, width: Math.max(2, x(soakEnd) - x(l.soak)), height: 16, fill: "#90caf9", stroke: "#1e88e5", "stroke-dasharray": "3 2" }));
      }
      if (l.verdict !== null) {
        const ok = /proceed|complete/i.test(l.verdictText);
        svg.append(s("path", { d: `M${x(l.verdict)} ${y + 2} l6 12 l-6 12 l-6 -12 z`, fill: ok ? "#2e7d32" : "#b71c1c" }),
          x(l.verdict) > W - 140
            ? s("text", { x: x(l.verdict) - 9, y: y + 18, "text-anchor": "end" }, l.verdictText)
            : s("text", { x: x(l.verdict) + 9, y: y + 18 }, l.verdictText));
      }
    } else {
      svg.append(s("text", { x: left, y: y + 18, fill: "#57606a" }, "does not start"));
    }
  });
  const legendY = 14;
  svg.append(s("rect", { x: left, y: legendY - 9, width: 12, height: 10, fill: "#1e88e5" }), s("text", { x: left + 16, y: legendY }, "dispatching"),
    s("rect", { x: left + 110, y: legendY - 9, width: 12, height: 10, fill: "#90caf9", stroke: "#1e88e5" }), s("text", { x: left + 126, y: legendY }, "soak"),
    s("path", { d: `M${left + 190} ${legendY - 10} l5 6 l-5 6 l-5 -6 z`, fill: "#2e7d32" }), s("text", { x: left + 200, y: legendY }, "verdict (red: stop)"));

  const waited = [
    waitedFirst ? `waits ${fmtDur(waitedFirst[1] - waitedFirst[0])} for its first window` : "no window to wait for at the start",
    defers.length ? `${defers.length} admissions deferred by the policy (e.g. ${defers[0].node || ""} ${defers[0].detail})` : "no admission deferred",
  ].join("; ");
  const c = r.counts || {};
  out.replaceChildren(
    h("h2", { text: "Expected outcome" }),
    h("dl", { class: "summary", id: "plan-summary" },
      h("dt", { text: "Final state" }), h("dd", {}, badge(r.final_state)),
      h("dt", { text: "Duration" }), h("dd", { text: fmtDur(span) + " (simulated)" }),
      h("dt", { text: "Waves" }), h("dd", { text: waves.map((w) => `${w.name} (${w.nodes.length})`).join(", ") || "none" }),
      h("dt", { text: "Windows waited" }), h("dd", { text: waited }),
      h("dt", { text: "Nodes" }), h("dd", { text: Object.entries(c).map(([k, v]) => `${v} ${k}`).join(", ") || "none" })),
    svg,
    h("p", { class: "muted", text: r.note || "" }),
    h("h2", { text: "Simulated decisions" }),
    table(["At", "Kind", "Node", "Detail"], ev.map((e) => h("tr", {},
      h("td", { text: "+" + fmtDur(e.at - t0) }), h("td", {}, h("code", { text: e.kind })),
      h("td", { class: "mono", text: e.node || "" }), h("td", { text: e.detail }))), { id: "plan-events" }));
}

// ----- start -----

function start() {
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    showWho();
    render();
  });
  window.addEventListener("hashchange", () => render());
  if (!location.hash) history.replaceState(null, "", "#/tasks");
  render();
}

document.addEventListener("DOMContentLoaded", start);
