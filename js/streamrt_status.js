// StreamRT frontend extension: live status and a stream toggle on the "Realtime Sampler" node (StreamRTSampler).
//
// * Status panel. The sampler sends a websocket event "streamrt.status" after each execution:
//   {node, frames, seconds, ms_per_frame, fps, stream_frames, backend, acceleration, parts, notes, device,
//   state}. "node" is the node's unique id (the graph node id, or "outer:inner" inside a subgraph).
//   "backend" says what runs the stream in a few words (e.g. "auto -> cuda_graph": what auto chose).
//   The panel shows the fps
//   (an exponential moving average seeded with the first measurement of a stream), the ms per frame of
//   the last execution, the frames of this stream, the backend and device, and the state: cold (no event
//   yet), warming, streaming, reset, or error. The latest status is also on node.streamrtStatus.
// * Stream toggle. "▶ Stream" queues the workflow and queues it again each time an execution finishes,
//   until "■ Stop" is pressed, an execution fails, it is interrupted (Cancel), or the workflow can't be
//   queued. It never piles prompts up: the next one is queued only when the queue is otherwise empty.
//
// Both are extra widgets at the end of the node's widget list, with serialize = false: they are not in
// the workflow's widgets_values and not in the prompt.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "StreamRTSampler";
const STATUS_EVENT = "streamrt.status";
const EMA_ALPHA = 0.25;
const STATUS_WIDGET = "streamrt_status";
// The canvas shows the button's label (▶ Stream or ■ Stop); the Vue renderer shows its name.
const BUTTON_WIDGET = "▶ Stream / ■ Stop";
const LABEL_START = "▶ Stream";
const LABEL_STOP = "■ Stop";
const LINE_HEIGHT = 16;
const PANEL_LINES = 3;
const PANEL_PAD = 6;
const STATE_COLORS = {
  cold: "#8a8a8a",
  warming: "#e0a030",
  streaming: "#4caf50",
  reset: "#42a5f5",
  error: "#ef5350",
};

const log = (...args) => console.info("[StreamRT]", ...args);

// ------------------------------------------------------------------------------------------- graph

function rootGraph() {
  return app.rootGraph ?? app.graph;
}

function isSampler(node) {
  return !!node && (node.comfyClass === NODE_TYPE || node.type === NODE_TYPE);
}

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
  return graphs.flatMap((g) => (g.nodes ?? g._nodes ?? []).filter(isSampler));
}

function redraw() {
  app.canvas?.setDirty?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------------------ status

const finite = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** Fold one "streamrt.status" event into the node's status (fps EMA seeded by a new stream's first value). */
function applyStatus(node, data) {
  const prev = node.streamrtStatus;
  const fps = finite(data.fps);
  const streamFrames = finite(data.stream_frames);
  const frames = finite(data.frames);
  // A new stream: the first event, a reset, a stream whose frames are all of this execution (new or
  // rebuilt), or a frame counter that went back (stream released by "Free model and node cache").
  const newStream = !prev || data.state === "reset" ||
    (streamFrames !== null && frames !== null && streamFrames <= frames) ||
    (streamFrames !== null && prev.stream_frames !== null && streamFrames < prev.stream_frames);
  let ema = newStream ? null : prev.fps;
  if (fps !== null) ema = ema === null ? fps : ema + EMA_ALPHA * (fps - ema);
  node.streamrtStatus = {
    state: typeof data.state === "string" ? data.state : "streaming",
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
  redrawPanel(node);
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
  redraw();
}

const fmt = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));

function fpsText(fps) {
  if (fps === null || fps === undefined) return "–";
  return fps >= 100 ? fps.toFixed(0) : fps >= 10 ? fps.toFixed(1) : fps.toFixed(2);
}

/** The panel's text lines: [state line, speed line, stream line]. */
function statusLines(node) {
  const s = node.streamrtStatus;
  const first = streamer.error ? `● stopped: ${streamer.error}` : `● ${s?.state ?? "cold"}`;
  if (!s) return [first, "fps –   ms/frame –", "frames 0   backend –"];
  const device = s.device ? ` · ${s.device}` : "";
  return [
    first,
    `fps ${fpsText(s.fps)}   ${fmt(s.ms_per_frame, 1)} ms/frame`,
    `frames ${s.stream_frames ?? "–"}   ${s.backend ?? "–"}${device}`,
  ];
}

function stateOf(node) {
  return streamer.error ? "error" : node.streamrtStatus?.state ?? "cold";
}

/** One line for the compact panel of the Vue node renderer ("Nodes 2.0"). */
function compactLine(node) {
  const s = node.streamrtStatus;
  if (streamer.error) return `● stopped: ${streamer.error}`;
  if (!s) return "● cold";
  return `● ${s.state}  ${fpsText(s.fps)} fps  ${fmt(s.ms_per_frame, 1)} ms  #${s.stream_frames ?? "–"}`;
}

const VUE_CANVAS_SHIFT = 13;
const vueNodes = () => !!globalThis.LiteGraph?.vueNodesMode;

function makeStatusWidget(node) {
  const fullHeight = PANEL_LINES * LINE_HEIGHT + 2 * PANEL_PAD;
  return {
    type: "streamrt_status",
    name: STATUS_WIDGET,
    value: "",
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the prompt
    computeSize(width) {
      // The Vue renderer gives a legacy widget one row: draw one line there.
      return [width ?? node.size?.[0] ?? 0, vueNodes() ? VUE_CANVAS_SHIFT + LINE_HEIGHT + 4 : fullHeight];
    },
    draw(ctx, drawNode, width, y, _h, lowQuality) {
      const compact = vueNodes();
      // The Vue renderer's widget canvas starts 13 px above its row (WidgetLegacy: mt-[-13px]).
      if (compact) y += VUE_CANVAS_SHIFT;
      const lines = compact ? [compactLine(drawNode)] : statusLines(drawNode);
      const height = compact ? LINE_HEIGHT + 4 : fullHeight;
      const pad = compact ? 2 : PANEL_PAD;
      this.lastDrawn = lines; // for tests: what the canvas was given
      const margin = 15;
      const w = Math.max(0, width - 2 * margin);
      ctx.save();
      ctx.fillStyle = "rgba(0, 0, 0, 0.28)";
      ctx.beginPath();
      if (ctx.roundRect) ctx.roundRect(margin, y, w, height, 6);
      else ctx.rect(margin, y, w, height);
      ctx.fill();
      if (!lowQuality) {
        ctx.beginPath();
        ctx.rect(margin, y, w, height);
        ctx.clip();
        ctx.font = "12px monospace";
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        lines.forEach((line, i) => {
          ctx.fillStyle = i === 0 ? STATE_COLORS[stateOf(drawNode)] ?? STATE_COLORS.cold
            : (globalThis.LiteGraph?.WIDGET_TEXT_COLOR ?? "#ddd");
          ctx.fillText(line, margin + 8, y + pad + LINE_HEIGHT * (i + 0.5));
        });
      }
      ctx.restore();
    },
  };
}

/** Redraw a node's panel: the canvas, and the Vue renderer's own little canvas when it has one. */
function redrawPanel(node) {
  try {
    node.widgets?.find((w) => w.name === STATUS_WIDGET)?.triggerDraw?.();
  } catch (err) {
    console.warn("[StreamRT] panel redraw failed", err);
  }
  node.setDirtyCanvas?.(true, false);
}

// ------------------------------------------------------------------------------------------ stream

/**
 * Queue the workflow once through the app, exactly as the Run button does (widgets' beforeQueued /
 * afterQueued callbacks, error dialog, progress on the nodes), and return the server's prompt id.
 * app.queuePrompt's own return value can't tell success (1.32.9 answers false after a good queue), so
 * api.queuePrompt is watched for the duration of this one call.
 */
async function queueWorkflowOnce() {
  const original = api.queuePrompt;
  let answer = null;
  let failure = null;
  const watcher = async function (...args) {
    try {
      answer = await original.apply(this, args);
      return answer;
    } catch (err) {
      failure = err;
      throw err;
    }
  };
  api.queuePrompt = watcher;
  try {
    await app.queuePrompt(0, 1);
  } finally {
    if (api.queuePrompt === watcher) api.queuePrompt = original;
  }
  if (failure) throw failure;
  if (!answer?.prompt_id) throw new Error("the workflow was not queued");
  return answer.prompt_id;
}

/** The re-queue loop behind the "▶ Stream / ■ Stop" buttons (one per browser tab). */
const streamer = {
  active: false,
  queuing: false,
  mine: new Set(), // ids of the prompts this loop queued that have not finished yet
  finished: [], // ids of recently finished prompts (an answer may come after its execution ended)
  remaining: 0, // the server's queue_remaining, from the last "status" event
  executions: 0, // executions of this loop's prompts that finished since the last start
  error: null,

  start() {
    if (this.active) return;
    this.active = true;
    this.error = null;
    this.executions = 0;
    log("stream started");
    refreshButtons();
    // A prompt of an earlier run still in flight queues the next one when it ends.
    if (this.mine.size === 0) this.queueNext();
  },

  stop(reason = null) {
    const was = this.active;
    this.active = false;
    if (reason) this.error = reason;
    if (was) log(reason ? `stream stopped: ${reason}` : "stream stopped");
    refreshButtons();
  },

  async queueNext() {
    if (!this.active || this.queuing) return;
    if (allSamplers().length === 0) {
      this.stop("no Realtime Sampler (StreamRT) in the workflow");
      return;
    }
    if (app.processingQueue) {
      // Another queuePrompt (e.g. the Run button) is being sent: try again when it is done.
      setTimeout(() => this.queueNext(), 50);
      return;
    }
    this.queuing = true;
    let id = null;
    try {
      id = await queueWorkflowOnce();
    } catch (err) {
      this.stop(`could not queue: ${err?.message ?? err}`);
    } finally {
      this.queuing = false;
    }
    if (id === null) return;
    if (this.finished.includes(id)) this.onFinished(id, true, true); // it ended before the answer came
    else this.mine.add(id);
  },

  onFinished(promptId, success, early = false) {
    const wasMine = this.mine.delete(promptId) || early;
    if (!early) this.finished = [...this.finished.slice(-15), promptId];
    if (!wasMine) return;
    if (success) this.executions++;
    // Queue the next one only when nothing else waits (remaining counts the prompt that just ended).
    if (this.active && this.mine.size === 0 && this.remaining <= 1) this.queueNext();
  },

  onQueueStatus(remaining) {
    this.remaining = remaining;
    // The queue went idle while streaming and none of ours is in flight (e.g. another client's prompts
    // ran in between): carry on.
    if (this.active && remaining === 0 && this.mine.size === 0) this.queueNext();
  },
};

function refreshButtons() {
  for (const node of allSamplers()) {
    const button = node.widgets?.find((w) => w.name === BUTTON_WIDGET);
    if (button) button.label = streamer.active ? LABEL_STOP : LABEL_START;
    redrawPanel(node);
  }
  redraw();
}

function addWidgets(node) {
  if (node.widgets?.some((w) => w.name === STATUS_WIDGET)) return;
  const button = node.addWidget("button", BUTTON_WIDGET, null, () => {
    if (streamer.active) streamer.stop();
    else streamer.start();
  }, { serialize: false });
  button.serialize = false;
  button.label = streamer.active ? LABEL_STOP : LABEL_START;
  button.tooltip = "Queue this workflow again each time it finishes, until stopped (or an error).";
  node.addCustomWidget(makeStatusWidget(node));
  fitSize(node);
}

/** Grow the node (never shrink it) so that the added widgets fit. */
function fitSize(node) {
  const min = node.computeSize?.();
  if (!min || !node.size) return;
  const w = Math.max(node.size[0], min[0]);
  const h = Math.max(node.size[1], min[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize?.([w, h]);
}

// --------------------------------------------------------------------------------------- extension

app.registerExtension({
  name: "StreamRT.status",

  async setup() {
    api.addEventListener(STATUS_EVENT, onStatusEvent);
    api.addEventListener("execution_success", (event) => {
      if (!streamer.active && streamer.error) { // a good run clears "stopped: ..."
        streamer.error = null;
        refreshButtons();
      }
      streamer.onFinished(event?.detail?.prompt_id, true);
    });
    api.addEventListener("execution_error", (event) => {
      const d = event?.detail ?? {};
      if (streamer.active) {
        streamer.stop(`error in ${d.node_type ?? "a node"}${d.node_id ? ` #${d.node_id}` : ""}`);
      }
      streamer.onFinished(d.prompt_id, false);
    });
    api.addEventListener("execution_interrupted", (event) => {
      streamer.stop(); // Cancel stops streaming (not an error)
      streamer.onFinished(event?.detail?.prompt_id, false);
    });
    api.addEventListener("status", (event) => {
      const remaining = event?.detail?.exec_info?.queue_remaining;
      if (typeof remaining === "number") streamer.onQueueStatus(remaining);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      try {
        addWidgets(this);
      } catch (err) {
        console.error("[StreamRT] could not add the status widgets", err);
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // A workflow saved without this extension may have a node too small for the panel.
      fitSize(this);
      return result;
    };
  },
});

// For tests and the browser console: window.StreamRT.streamer.start() / .stop().
globalThis.StreamRT = Object.assign(globalThis.StreamRT ?? {}, {
  streamer, nodeForUniqueId, statusLines, widgets: { button: BUTTON_WIDGET, status: STATUS_WIDGET },
});
