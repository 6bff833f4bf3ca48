// The /demo page: streams observations from the browser with the TypeScript client (bundled as
// /demo/engram-client.js), shows acks, credits and backpressure, and recalls live.
//
// URL parameters: space, dim, batch (observations per batch), rate (batches/s), k,
// autostart=1, autorecall=1. window.engramDemo exposes the state for tests.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const WORDS = [
  "kitchen", "meeting", "train", "coffee", "email", "garden", "invoice", "lecture", "river",
  "concert", "doctor", "museum", "deadline", "birthday", "library", "market", "storm", "bridge",
];

const state = {
  connection: "idle",
  sessionId: "",
  running: false,
  sentBatches: 0,
  sentObs: 0,
  ackedBatches: 0,
  ackedObs: 0,
  failed: 0,
  recalls: 0,
  lastAck: null,
  lastRecall: null,
  lastRecallCue: null,
  ids: [],
  events: [],
  fatal: "",
};

let client = null;
let stream = null;
let lastBatch = null;
const inflight = new Set();
const ackTimes = [];
const idPrefix = `p${Math.random().toString(36).slice(2, 8)}`;

function log(kind, detail) {
  const time = new Date().toISOString().slice(11, 23);
  state.events.push({ time, kind, detail });
  if (state.events.length > 200) state.events.shift();
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = `${time} ${kind}: ${detail}`;
  const ol = $("log");
  ol.prepend(li);
  while (ol.children.length > 60) ol.lastChild.remove();
}

function fatal(message) {
  state.fatal = message;
  $("fatal").hidden = false;
  $("fatal").textContent = message;
}

function onEvent(e) {
  if (e.kind === "connected" || e.kind === "resumed") {
    state.connection = e.kind;
    state.sessionId = e.sessionId;
  } else if (e.kind === "disconnected") {
    state.connection = "reconnecting";
  } else if (e.kind === "closed") {
    state.connection = "closed";
  }
  if (e.kind === "error" && stream === null) state.connection = "failed";
  if (e.kind !== "ack" && e.kind !== "heartbeat" && !(e.kind === "status" && e.detail.startsWith("active: BUFFER_STATUS"))) {
    log(e.kind, e.detail);
  }
}

function unitVectors(n, dim) {
  const v = new Float32Array(n * dim);
  for (let i = 0; i < n; i++) {
    let norm = 0;
    for (let j = 0; j < dim; j++) {
      const x = Math.random() * 2 - 1;
      v[i * dim + j] = x;
      norm += x * x;
    }
    norm = Math.sqrt(norm) || 1;
    for (let j = 0; j < dim; j++) v[i * dim + j] /= norm;
  }
  return v;
}

function settings() {
  const num = (id, lo, hi) => Math.min(hi, Math.max(lo, Number($(id).value) || lo));
  return {
    space: $("space").value.trim(),
    dim: num("dim", 2, 4096),
    perBatch: num("batch", 1, 10000),
    rate: num("rate", 1, 1000),
    k: num("k", 1, 100),
  };
}

async function connect(space) {
  if (stream && stream.space === space) return stream;
  if (stream) await stream.close();
  stream = null;
  state.connection = "connecting";
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  stream = await client.openStream({ url: `${scheme}://${location.host}/v1/stream`, space, onEvent });
  return stream;
}

async function start() {
  if (state.running || !client) return;
  const s = settings();
  try {
    await connect(s.space);
  } catch (err) {
    state.connection = "failed";
    fatal(`could not open a stream on ${s.space}: ${err.message}`);
    return;
  }
  state.running = true;
  $("start").disabled = true;
  $("stop").disabled = false;
  $("recall").disabled = false;
  for (const id of ["space", "dim"]) $(id).disabled = true;
  produce(s).catch((err) => {
    state.running = false;
    fatal(`streaming stopped: ${err.message}`);
  });
}

async function produce(s) {
  let next = performance.now();
  while (state.running) {
    await stream.writable();
    if (!state.running) break;
    const { perBatch, rate } = settings();
    const b = state.sentBatches;
    const vectors = unitVectors(perBatch, s.dim);
    const ids = Array.from({ length: perBatch }, (_, i) => `${idPrefix}-${b}-${i}`);
    const contents = ids.map((_, i) => `${WORDS[(b + i) % WORDS.length]} #${b}.${i}`);
    state.sentBatches += 1;
    state.sentObs += perBatch;
    state.ids.push(...ids);
    lastBatch = { vectors, dim: s.dim, ids, contents };
    const p = stream.send({ vectors, dim: s.dim, ids, contents });
    inflight.add(p);
    p.then(
      (ack) => {
        state.ackedBatches += 1;
        state.ackedObs += perBatch;
        state.lastAck = ack;
        ackTimes.push([performance.now(), perBatch]);
      },
      (err) => {
        state.failed += 1;
        log("error", `batch ${b} failed: ${err.message}`);
      },
    ).finally(() => inflight.delete(p));
    next += 1000 / rate;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    else next = performance.now();
  }
}

async function stop() {
  state.running = false;
  $("stop").disabled = true;
  await Promise.allSettled([...inflight]);
  if (stream) await stream.flush().catch(() => {});
  $("start").disabled = false;
}

async function recall() {
  if (!stream || !lastBatch) return null;
  const { k } = settings();
  const row = Math.floor(Math.random() * lastBatch.ids.length);
  const cue = lastBatch.vectors.slice(row * lastBatch.dim, (row + 1) * lastBatch.dim);
  for (let j = 0; j < cue.length; j++) cue[j] += (Math.random() - 0.5) * 0.02;
  const expected = lastBatch.ids[row];
  state.lastRecallCue = expected;
  try {
    const result = await stream.recall(cue, { k, consistency: "session" });
    state.recalls += 1;
    state.lastRecall = result;
    renderRecall(result, expected);
    return result;
  } catch (err) {
    log("error", `recall failed: ${err.message}`);
    return null;
  }
}

function renderRecall(result, expected) {
  const tbody = $("results").querySelector("tbody");
  tbody.replaceChildren(
    ...result.results.map((m, i) => {
      const tr = document.createElement("tr");
      if (m.id === expected) tr.style.fontWeight = "600";
      const when = m.when ? m.when.slice(11, 23) : "";
      for (const text of [i + 1, m.id, m.content, m.score.toFixed(4), m.lsn, when]) {
        const td = document.createElement("td");
        td.textContent = String(text);
        tr.append(td);
      }
      tr.children[3].className = "score";
      return tr;
    }),
  );
  const md = result.metadata;
  $("recall-meta").textContent =
    `cue near ${expected}: ${result.results.length} results at snapshot LSN ` +
    `${result.snapshotSequence}` +
    (md ? `, ${md.consistency}, ${(md.latency_us / 1000).toFixed(1)} ms` : "");
}

function render() {
  const set = (id, v) => {
    const el = $(id);
    const text = String(v);
    if (el.textContent !== text) el.textContent = text;
  };
  set("conn", state.connection);
  $("conn").dataset.state = state.connection;
  set("session", state.sessionId || "-");
  set("sent-batches", state.sentBatches);
  set("sent-obs", state.sentObs);
  set("acked-batches", state.ackedBatches);
  set("acked-obs", state.ackedObs);
  set("failed", state.failed);
  const now = performance.now();
  while (ackTimes.length && now - ackTimes[0][0] > 2000) ackTimes.shift();
  set("rate-obs", Math.round(ackTimes.reduce((a, [, n]) => a + n, 0) / 2));
  if (state.lastAck) {
    set("last-ack", `#${state.lastAck.sequenceNumber} LSN ${state.lastAck.firstLsn}${state.lastAck.duplicate ? " (dup)" : ""}`);
  }
  if (stream) {
    set("reconnects", stream.reconnects);
    set("heartbeats", stream.heartbeats);
    set("in-flight", stream.inFlight);
    set("window", stream.window);
    set("max-in-flight", stream.maxInFlight);
    set("rejections", stream.rejections);
    const pct = Math.min(100, (100 * stream.inFlight) / Math.max(1, stream.window));
    $("credits-bar").style.width = `${pct}%`;
    $("credits-bar").classList.toggle("full", pct >= 100);
    const st = stream.status;
    if (st) {
      set("bp-state", st.state);
      $("bp-state").dataset.state = st.state;
      set("bp-level", `${(st.level ?? "-").replace("level_", "")} (pressure ${Number(st.pressure).toFixed(2)})`);
      set("bp-depth", st.queue_depth);
      set("bp-capacity", st.queue_capacity);
    }
  }
}

async function main() {
  $("space").value = params.get("space") || `demo-${Math.random().toString(36).slice(2, 8)}`;
  for (const key of ["dim", "batch", "rate", "k"]) if (params.get(key)) $(key).value = params.get(key);
  $("autorecall").checked = params.get("autorecall") === "1";
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("recall").onclick = recall;
  setInterval(render, 200);
  setInterval(() => {
    if (stream && stream.connected) stream.flowControl("buffer_status");
  }, 1000);
  setInterval(() => {
    if ($("autorecall").checked && state.running) recall();
  }, 2000);
  try {
    client = await import("/demo/engram-client.js");
  } catch (err) {
    fatal(`the stream client did not load: ${err.message}`);
    $("start").disabled = true;
    return;
  }
  if (params.get("autostart") === "1") await start();
}

window.engramDemo = {
  state,
  start,
  stop,
  recall,
  ids: () => state.ids.slice(),
  get stream() {
    return stream;
  },
  ready: main(),
};
