// StreamRT frontend extension: the stream control and status panel of the "Realtime Sampler" (StreamRTSampler),
// and the stream view's housekeeping (Stream Preview, StreamRTPreview). Built on the frontend's extension API:
// app.registerExtension hooks (setup, nodeCreated, loadedGraphNode), api events, node.addDOMWidget and
// app.extensionManager (queue mode and commands); nothing of the frontend is patched or replaced.
//
// * Panel. One HTML widget (node.addDOMWidget) on each sampler: the "▶ Stream / ■ Stop" button and three lines:
//   the state (cold, warming, streaming, reset, batch k/N, stopped: ...), the speeds (the loop's real rate next
//   to the sampler's own fps and ms per frame) and the stream (frames, what runs it, device). Both node
//   renderers (the canvas and "Nodes 2.0") show the same element at its natural height, so no pixel offsets
//   and no clipping. The latest status is also on node.streamrtStatus, the loop's measurements on
//   node.streamrtLoop.
// * Loop rate. Measured here, in the browser, from execution start to execution start ("execution_start") of
//   the prompts that ran the sampler while streaming, over the last LOOP_WINDOW intervals: what the stream
//   really delivers, capture, upload and queueing included.
// * Status events. The sampler sends "streamrt.status" after each execution: {node, workflow, prompt_id, frames,
//   seconds, ms_per_frame, fps, overlap, stream_frames, backend, acceleration, parts, notes, device, state}; "node" is the
//   node's unique id (the graph node id, or "outer:inner" inside a subgraph). A video also sends
//   {state: "batch", done, total, fps} while it runs (with its newest frame as the node's preview).
//   The sampler fps on the panel is an exponential moving average seeded with the first measurement of a stream.
// * ▶ Stream is the frontend's own instant queue ("Run (Instant)": queue again whenever the queue is empty):
//   the button switches that mode on and queues once, ■ Stop (or the Run button's mode menu) switches it back.
//   The extension adds what the instant mode does not do by itself: it stops on Cancel, on an execution error,
//   when the workflow cannot be queued or no longer has a sampler, and it deletes the loop's older entries from
//   the queue history (ComfyUI's /history delete), so a stream of hours leaves a bounded history.
// * Previews. The frontend replaces a node's preview image without revoking the previous object URL; for the
//   StreamRT nodes, whose previews arrive every frame, the replaced URLs are revoked here.
//
// The panel widget has serialize = false: it is not in the workflow's widgets_values and not in the prompt.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "StreamRTSampler";
const PREVIEW = "StreamRTPreview";
const STATUS_EVENT = "streamrt.status";
const PANEL_WIDGET = "streamrt_stream";
const EMA_ALPHA = 0.25;
const LABEL_START = "▶ Stream";
const LABEL_STOP = "■ Stop";
/** executions in the loop-rate window: the rate is taken over the last LOOP_WINDOW intervals */
const LOOP_WINDOW = 8;
/** the loop's newest history entries kept; older ones are deleted HISTORY_BATCH at a time */
const HISTORY_KEEP = 10;
const HISTORY_BATCH = 10;
/** a queued prompt shows in the server's queue at once: none after this long means it was refused */
const QUEUE_CHECK_MS = 1500;
/** a replaced preview URL is revoked after this long (an image may still be loading from it) */
const REVOKE_AFTER_MS = 1000;
const STATE_COLORS = {
  cold: "#8a8a8a",
  warming: "#e0a030",
  streaming: "#4caf50",
  reset: "#42a5f5",
  batch: "#ab47bc",
  error: "#ef5350",
};

const log = (...args) => console.info("[StreamRT]", ...args);

// ------------------------------------------------------------------------------------------- graph

function rootGraph() {
  return app.rootGraph ?? app.graph;
}

const typeOf = (node) => node?.comfyClass ?? node?.type;
const isSampler = (node) => typeOf(node) === SAMPLER;
const isStreamNode = (node) => typeOf(node) === SAMPLER || typeOf(node) === PREVIEW;

/** The node of a unique id: "12" (root graph) or "5:12" (node 12 inside subgraph node 5). */
function nodeForUniqueId(uniqueId) {
  let graph = rootGraph();
  const parts = String(uniqueId).split(":");
  for (let i = 0; graph && i < parts.length - 1; i++) {
    graph = graph.getNodeById?.(parts[i])?.subgraph ?? null;
  }
  return graph?.getNodeById?.(parts[parts.length - 1]) ?? null;
}

/** Every StreamRT sampler of the workflow: root graph and subgraph definitions. */
function allSamplers() {
  const root = rootGraph();
  if (!root) return [];
  const graphs = [root, ...(root.subgraphs?.values?.() ?? [])];
  return graphs.flatMap((g) => (g.nodes ?? []).filter(isSampler));
}

// ------------------------------------------------------------------------------------------ status

const finite = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** Fold one "streamrt.status" event into the node's status (fps EMA seeded by a new stream's first value). */
function applyStatus(node, data) {
  const prev = node.streamrtStatus;
  if (data.state === "batch") {
    node.streamrtStatus = {
      ...(prev ?? { fps: null, ms_per_frame: null, stream_frames: null, backend: null, device: null, notes: [],
        executions: 0 }),
      state: "batch", done: finite(data.done), total: finite(data.total), batch_fps: finite(data.fps),
      updated: Date.now(),
    };
    return;
  }
  const fps = finite(data.fps);
  const streamFrames = finite(data.stream_frames);
  const frames = finite(data.frames);
  // A new stream: the first event, a reset, a stream whose frames are all of this execution (new or
  // rebuilt), or a frame counter that went back (stream released by "Free model and node cache").
  const newStream = !prev || prev.stream_frames === null || data.state === "reset" ||
    (streamFrames !== null && frames !== null && streamFrames <= frames) ||
    (streamFrames !== null && streamFrames < prev.stream_frames);
  // Overlapped executions (Stream Settings' overlap_executions) hand over the frame of the execution before and
  // report no speed of their own: the loop's rate is the stream's; an average from before would be stale.
  const overlap = data.overlap === true;
  let ema = newStream || overlap ? null : prev.fps;
  if (fps !== null) ema = ema === null ? fps : ema + EMA_ALPHA * (fps - ema);
  node.streamrtStatus = {
    state: typeof data.state === "string" ? data.state : "streaming",
    overlap,
    fps: ema,
    last_fps: fps,
    ms_per_frame: finite(data.ms_per_frame),
    frames,
    stream_frames: streamFrames,
    backend: data.backend ?? null,
    acceleration: data.acceleration ?? null,
    notes: Array.isArray(data.notes) ? data.notes : [],
    device: data.device ?? null,
    executions: newStream ? 1 : (prev.executions ?? 0) + 1,
    updated: Date.now(),
  };
}

/** When each prompt started executing, as this browser saw it ("execution_start"): the loop's clock. */
const startedAt = new Map();

function onExecutionStart(event) {
  const id = event?.detail?.prompt_id;
  if (id) startedAt.set(id, performance.now());
  while (startedAt.size > 4 * LOOP_WINDOW) startedAt.delete(startedAt.keys().next().value);
  loop.lastBusy = performance.now();
}

/** The loop's real rate on a node, measured in the browser: from execution start to execution start of the
 * prompts that ran this sampler while streaming (the start, not the status event that comes after the sampler
 * ran, so the sampler's own time varying from frame to frame does not shift the measurement). */
function measureLoop(node, data) {
  const record = node.streamrtLoop ??= { times: [], prompts: [], fps: null, executions_per_s: null };
  record.times.push(startedAt.get(data.prompt_id) ?? performance.now());
  record.prompts.push(data.prompt_id ?? null);
  if (record.times.length > LOOP_WINDOW + 1) {
    record.times.shift();
    record.prompts.shift();
  }
  const n = record.times.length;
  const span = (record.times[n - 1] - record.times[0]) / 1000;
  record.executions_per_s = n > 1 && span > 0 ? (n - 1) / span : null;
  record.fps = record.executions_per_s === null ? null : record.executions_per_s * (finite(data.frames) ?? 1);
}

function onStatusEvent(event) {
  const data = event?.detail;
  if (!data || data.node === undefined || data.node === null) return;
  // Node ids repeat across workflows: an event from another open workflow is not for this graph.
  const shownId = app.graph?.id;
  if (data.workflow && shownId && data.workflow !== shownId) return;
  const node = nodeForUniqueId(data.node);
  if (!isSampler(node)) return;
  applyStatus(node, data);
  if (data.state !== "batch" && loop.active) {
    measureLoop(node, data);
    loop.ran(data.prompt_id);
  }
  refreshPanel(node);
}

const fmt = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));

/** "2.08 fps" (three significant digits up to 100), or "–" when unknown. */
function fpsText(fps) {
  if (fps === null || fps === undefined) return "–";
  return `${fps >= 100 ? fps.toFixed(0) : fps >= 10 ? fps.toFixed(1) : fps.toFixed(2)} fps`;
}

function stateOf(node) {
  return loop.error ? "error" : node.streamrtStatus?.state ?? "cold";
}

/** The panel's text lines: [state, speeds, stream]. */
function statusLines(node) {
  const s = node.streamrtStatus;
  const rate = node.streamrtLoop?.fps ?? null;
  let state = `● ${s?.state ?? "cold"}`;
  if (s?.state === "batch") state = `● batch ${s.done ?? "–"}/${s.total ?? "–"} frames`;
  if (loop.error) state = `● stopped: ${loop.error}`;
  if (!s) return [state, "loop –   sampler –", "frames 0   backend –"];
  const speed = s.state === "batch"
    ? `sampler ${fpsText(s.batch_fps)} so far`
    : s.overlap ? `loop ${fpsText(rate)}   sampler overlapped (frames 1 execution later)`
    : `loop ${fpsText(rate)}   sampler ${fpsText(s.fps)}   ${fmt(s.ms_per_frame, 1)} ms`;
  const device = s.device ? ` · ${s.device}` : "";
  return [state, speed, `frames ${s.stream_frames ?? "–"}   ${s.backend ?? "–"}${device}`];
}

// ------------------------------------------------------------------------------------------- panel

/** The panel element of a sampler: the button and the three status lines. */
function makePanel() {
  const panel = document.createElement("div");
  panel.className = "streamrt-panel";
  Object.assign(panel.style, { display: "flex", flexDirection: "column", boxSizing: "border-box" });
  const body = document.createElement("div"); // natural height: what the widget needs
  Object.assign(body.style, {
    display: "flex", flexDirection: "column", gap: "0.3em", padding: "0.35em 0.5em", borderRadius: "6px",
    borderLeft: `4px solid ${STATE_COLORS.cold}`, background: "rgba(0, 0, 0, 0.28)",
    font: "12px / 1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    color: "var(--input-text, #ddd)", overflowWrap: "anywhere",
  });
  const button = document.createElement("button");
  button.type = "button";
  button.className = "streamrt-toggle";
  button.title = "Queue this workflow again each time the queue is empty (the frontend's instant queue), " +
    "until stopped, Cancel or an error.";
  Object.assign(button.style, {
    font: "inherit", padding: "0.25em 0.5em", cursor: "pointer", borderRadius: "4px",
    color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
    border: "1px solid var(--border-color, #444)",
  });
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    if (loop.active) loop.stop();
    else loop.start();
  });
  const lines = [0, 1, 2].map((i) => {
    const line = document.createElement("div");
    line.className = `streamrt-line streamrt-line-${i}`;
    body.append(line);
    return line;
  });
  body.prepend(button);
  panel.append(body);
  panel.streamrt = { body, button, lines };
  return panel;
}

function addPanel(node) {
  if (node.widgets?.some((w) => w.name === PANEL_WIDGET)) return;
  const panel = makePanel();
  const margin = 4;
  const widget = node.addDOMWidget(PANEL_WIDGET, "streamrt_stream", panel, {
    serialize: false, // not in the prompt
    hideOnZoom: true,
    margin,
    // the panel's own height once it is on the page (a first guess of four lines before that)
    getMinHeight: () => (panel.streamrt.body.offsetHeight || 4 * 18 + 12) + 2 * margin,
  });
  widget.serialize = false; // not in widgets_values
  refreshPanel(node);
  fitSize(node);
}

/** Write the node's status into its panel (and the button's label). */
function refreshPanel(node) {
  const panel = node.widgets?.find((w) => w.name === PANEL_WIDGET)?.element;
  if (!panel?.streamrt) return;
  const { body, button, lines } = panel.streamrt;
  const text = statusLines(node);
  const colour = STATE_COLORS[stateOf(node)] ?? STATE_COLORS.cold;
  text.forEach((t, i) => {
    if (lines[i].textContent !== t) lines[i].textContent = t;
  });
  lines[0].style.color = colour;
  body.style.borderLeftColor = colour;
  body.title = (node.streamrtStatus?.notes ?? []).join("\n");
  const label = loop.active ? LABEL_STOP : LABEL_START;
  if (button.textContent !== label) button.textContent = label;
  button.disabled = !loop.queue;
}

function refreshAll() {
  for (const node of allSamplers()) refreshPanel(node);
}

/** Grow the node (never shrink it) so that its widgets fit. */
function fitSize(node) {
  const min = node.computeSize?.();
  if (!min || !node.size) return;
  const w = Math.max(node.size[0], min[0]);
  const h = Math.max(node.size[1], min[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize?.([w, h]);
}

// ------------------------------------------------------------------------------------------- loop

/** The ▶ Stream loop: the frontend's instant queue mode, plus stopping rules and history pruning. */
const loop = {
  /** the frontend's queue settings (mode: "disabled" | "instant" | "change", batchCount) */
  get queue() {
    return app.extensionManager?.queueSettings ?? null;
  },
  get active() {
    return this.queue?.mode === "instant";
  },
  error: null,
  executions: 0, // successful executions since the last start
  remaining: 0, // the server's queue_remaining, from the last "status" event
  lastIdle: 0, // when the server's queue was last seen empty / busy (performance.now())
  lastBusy: 0,
  previousMode: "disabled",
  kept: [], // prompt ids of the loop's executions still in the history, oldest first

  start() {
    const queue = this.queue;
    if (!queue) {
      this.error = "this frontend has no instant queue";
      refreshAll();
      return;
    }
    if (allSamplers().length === 0) return;
    this.error = null;
    this.executions = 0;
    for (const node of allSamplers()) node.streamrtLoop = null;
    if (queue.mode !== "instant") this.previousMode = queue.mode;
    queue.mode = "instant";
    log("stream started");
    refreshAll();
    // The instant mode queues when the queue becomes empty; when it is empty now, queue the first one.
    if (this.remaining === 0) app.extensionManager.command.execute("Comfy.QueuePrompt");
  },

  stop(reason = null) {
    if (reason) this.error = reason;
    if (this.active) {
      this.queue.mode = this.previousMode === "instant" ? "disabled" : this.previousMode;
      log(reason ? `stream stopped: ${reason}` : "stream stopped");
    }
    refreshAll();
  },

  /** An execution of the loop ran (its status event came): keep its history entry, delete older ones. */
  ran(promptId) {
    if (!promptId || this.kept.includes(promptId)) return;
    this.kept.push(promptId);
    if (this.kept.length <= HISTORY_KEEP + HISTORY_BATCH) return;
    const old = this.kept.splice(0, this.kept.length - HISTORY_KEEP);
    api.fetchApi("/history", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ delete: old }),
    }).catch((err) => console.warn("[StreamRT] could not prune the queue history", err));
  },

  onQueueStatus(remaining) {
    this.remaining = remaining;
    if (remaining > 0) this.lastBusy = performance.now();
    else this.lastIdle = performance.now();
    // Another workflow tab is shown now: the instant queue would queue it next. (This listener runs before
    // the frontend's instant queue, which reacts to the same event a moment later.)
    if (this.active && remaining === 0 && allSamplers().length === 0) {
      this.stop("no Realtime Sampler in the workflow");
    }
  },

  /** The frontend finished a queue attempt: if nothing reached the server's queue, the prompt was refused. */
  onQueued() {
    if (!this.active) return;
    const idle = this.lastIdle;
    setTimeout(() => {
      if (this.active && this.remaining === 0 && this.lastBusy <= idle) {
        this.stop("the workflow could not be queued");
      }
    }, QUEUE_CHECK_MS);
  },
};

// ---------------------------------------------------------------------------------------- previews

const previewUrls = new Map(); // locator id -> the preview URLs last seen for a StreamRT node

/** The store key of a node's previews: its id, prefixed by its subgraph's id inside a subgraph. */
function locatorOf(node) {
  return node.graph && node.graph !== rootGraph() ? `${node.graph.id}:${node.id}` : String(node.id);
}

/** After the frontend stored a new preview of a StreamRT node: revoke the URLs it replaced. */
function onPreview(event) {
  const node = nodeForUniqueId(event?.detail?.displayNodeId ?? event?.detail?.nodeId);
  if (!isStreamNode(node)) return;
  const key = locatorOf(node);
  const now = app.nodePreviewImages?.[key] ?? [];
  const before = previewUrls.get(key) ?? [];
  previewUrls.set(key, [...now]);
  const replaced = before.filter((url) => !now.includes(url));
  if (!replaced.length) return;
  setTimeout(() => {
    const shown = new Set(Object.values(app.nodePreviewImages ?? {}).flat());
    for (const url of replaced) if (!shown.has(url)) URL.revokeObjectURL(url);
  }, REVOKE_AFTER_MS);
}

// --------------------------------------------------------------------------------------- extension

app.registerExtension({
  name: "StreamRT.status",

  async setup() {
    api.addEventListener(STATUS_EVENT, onStatusEvent);
    api.addEventListener("b_preview_with_metadata", onPreview);
    api.addEventListener("execution_start", onExecutionStart);
    api.addEventListener("execution_success", () => {
      if (loop.active) loop.executions++;
      else if (loop.error) { // a good run clears "stopped: ..."
        loop.error = null;
        refreshAll();
      }
    });
    api.addEventListener("execution_error", (event) => {
      const d = event?.detail ?? {};
      if (loop.active) loop.stop(`error in ${d.node_type ?? "a node"}${d.node_id ? ` #${d.node_id}` : ""}`);
    });
    api.addEventListener("execution_interrupted", () => loop.stop()); // Cancel stops streaming (not an error)
    api.addEventListener("status", (event) => {
      const remaining = event?.detail?.exec_info?.queue_remaining;
      if (typeof remaining === "number") loop.onQueueStatus(remaining);
    });
    api.addEventListener("promptQueued", () => loop.onQueued());
    // The Run button's mode menu switches the same instant mode: keep the buttons' labels with it.
    loop.queue?.$subscribe?.(() => refreshAll());
  },

  nodeCreated(node) {
    try {
      if (isSampler(node)) addPanel(node);
    } catch (err) {
      console.error("[StreamRT] could not add the stream panel", err);
    }
  },

  loadedGraphNode(node) {
    // A workflow saved without this extension may have a node too small for the panel.
    if (isSampler(node)) fitSize(node);
  },
});

// For tests and the browser console: window.StreamRT.loop.start() / .stop().
globalThis.StreamRT = Object.assign(globalThis.StreamRT ?? {}, {
  loop, nodeForUniqueId, statusLines, widgets: { panel: PANEL_WIDGET }, constants: {
    LOOP_WINDOW, HISTORY_KEEP, HISTORY_BATCH, EMA_ALPHA, STATE_COLORS,
  },
});
