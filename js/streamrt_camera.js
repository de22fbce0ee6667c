// StreamRT frontend extension: the camera of "Stream Frame Input" (StreamRTFrameInput). Built on the frontend's
// extension API (app.registerExtension, node.addDOMWidget, api.fetchApi); nothing of the frontend is patched.
//
// * Camera. One HTML widget on each Stream Frame Input node: a small live view of the camera, a "● Camera /
//   ■ Camera off" button and a status line. While on, every new camera frame is drawn into a canvas of the node's
//   width x height (center crop; the camera's own size where they are 0), encoded as JPEG and posted to
//   /api/streamrt/frames/<source>; the server keeps the newest frame in memory for the node (no file, nothing
//   hashed). One post is in flight at a time: frames the server cannot take yet are dropped, never queued.
// * Queueing a prompt from this browser switches on the camera of every Stream Frame Input node of the workflow
//   that is not bypassed and was not switched off on the node (the node waits for its first frame: its timeout),
//   unless something else fed its source in the last FED_WITHIN_S seconds (another program posting frames).
// * A refused post (a source name that is not valid, say) stops the camera and says why on the node.
//
// The widget has serialize = false: it is not in the workflow's widgets_values and not in the prompt.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FRAME_INPUT = "StreamRTFrameInput";
const CAMERA_WIDGET = "streamrt_camera";
const JPEG_QUALITY = 0.9;
/** the posting rate on the status line is taken over this many posts */
const RATE_WINDOW = 15;
/** a source that got a frame this recently has another feeder: a queue does not switch the camera on */
const FED_WITHIN_S = 2;

const typeOf = (node) => node?.comfyClass ?? node?.type;
const widgetValue = (node, name) => node.widgets?.find((w) => w.name === name)?.value;

/** The camera of one node: its stream, elements and posting state. */
class Camera {
  constructor(node, element) {
    this.node = node;
    this.element = element;
    this.stream = null;
    this.inFlight = false;
    this.posted = 0; // frames the server took since the camera started
    this.times = []; // when the last RATE_WINDOW posts were taken
    this.error = null;
    this.userOff = false; // turned off on the node: queueing does not switch it on again
    this.canvas = document.createElement("canvas");
  }

  get on() {
    return this.stream !== null;
  }

  async start() {
    if (this.on) return;
    this.error = null;
    const width = widgetValue(this.node, "width") || undefined;
    const height = widgetValue(this.node, "height") || undefined;
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        video: { width: width && { ideal: width }, height: height && { ideal: height } }, audio: false,
      });
    } catch (err) {
      this.stream = null;
      this.error = `camera not available: ${err?.name ?? err}` +
        (window.isSecureContext ? "" : " (the browser allows cameras only on localhost or https)");
      this.refresh();
      return;
    }
    const video = this.element.streamrt.video;
    video.srcObject = this.stream;
    await video.play().catch(() => {});
    this.posted = 0;
    this.times = [];
    this.refresh();
    this.schedule();
  }

  stop(error = null) {
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = null;
    this.element.streamrt.video.srcObject = null;
    this.error = error;
    this.refresh();
  }

  /** Call capture() at the next camera frame (the next animation frame where the browser has no frame callback). */
  schedule() {
    if (!this.on) return;
    const video = this.element.streamrt.video;
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(() => this.capture());
    else requestAnimationFrame(() => this.capture());
  }

  /** The newest camera frame at the node's size (center crop), or null before the camera delivers one. */
  drawFrame() {
    const video = this.element.streamrt.video;
    const vw = video.videoWidth, vh = video.videoHeight;
    if (!vw || !vh) return null;
    const width = widgetValue(this.node, "width") || vw;
    const height = widgetValue(this.node, "height") || vh;
    const scale = Math.max(width / vw, height / vh);
    const sw = width / scale, sh = height / scale;
    this.canvas.width = width;
    this.canvas.height = height;
    this.canvas.getContext("2d").drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, width, height);
    return this.canvas;
  }

  async capture() {
    if (!this.on) return;
    const canvas = this.inFlight ? null : this.drawFrame();
    if (canvas) {
      this.inFlight = true;
      try {
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
        const source = encodeURIComponent(String(widgetValue(this.node, "source") ?? ""));
        const answer = await api.fetchApi(`/streamrt/frames/${source}`, {
          method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" },
        });
        if (!answer.ok) {
          const text = await answer.text();
          let message = text;
          try { message = JSON.parse(text).error ?? text; } catch { /* not JSON: the text itself */ }
          this.stop(`refused: ${message}`);
        } else {
          this.posted++;
          this.times.push(performance.now());
          if (this.times.length > RATE_WINDOW) this.times.shift();
          this.refresh();
        }
      } catch (err) {
        this.stop(`could not post a frame: ${err?.message ?? err}`);
      } finally {
        this.inFlight = false;
      }
    }
    this.schedule();
  }

  get rate() {
    const t = this.times;
    return t.length > 1 ? (1000 * (t.length - 1)) / (t[t.length - 1] - t[0]) : null;
  }

  statusText() {
    if (this.error) return this.error;
    if (!this.on) return "camera off";
    const source = widgetValue(this.node, "source");
    const rate = this.rate;
    return `posting to '${source}': ${this.posted} frames` + (rate ? `, ${rate.toFixed(1)} fps` : "");
  }

  refresh() {
    const { button, line } = this.element.streamrt;
    const label = this.on ? "■ Camera off" : "● Camera";
    if (button.textContent !== label) button.textContent = label;
    const text = this.statusText();
    if (line.textContent !== text) line.textContent = text;
    line.style.color = this.error ? "#ef5350" : "var(--input-text, #ddd)";
  }
}

function makeElement() {
  const element = document.createElement("div");
  element.className = "streamrt-camera";
  Object.assign(element.style, {
    display: "flex", flexDirection: "column", gap: "0.3em", padding: "0.35em 0.5em", boxSizing: "border-box",
    font: "12px / 1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace", color: "var(--input-text, #ddd)",
    background: "rgba(0, 0, 0, 0.28)", borderRadius: "6px", overflowWrap: "anywhere",
  });
  const button = document.createElement("button");
  button.type = "button";
  button.className = "streamrt-camera-toggle";
  button.title = "Capture this browser's camera and post its frames to the server under the node's source name.";
  Object.assign(button.style, {
    font: "inherit", padding: "0.25em 0.5em", cursor: "pointer", borderRadius: "4px",
    color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
    border: "1px solid var(--border-color, #444)",
  });
  const video = document.createElement("video");
  video.muted = true;
  video.playsInline = true;
  Object.assign(video.style, { width: "100%", maxHeight: "160px", objectFit: "contain", background: "#000" });
  const line = document.createElement("div");
  line.className = "streamrt-camera-status";
  element.append(button, video, line);
  element.streamrt = { button, video, line };
  return element;
}

function addCamera(node) {
  if (node.streamrtCamera) return;
  const element = makeElement();
  const camera = new Camera(node, element);
  node.streamrtCamera = camera;
  element.streamrt.button.addEventListener("click", (event) => {
    event.stopPropagation();
    camera.userOff = camera.on;
    if (camera.on) camera.stop();
    else camera.start();
  });
  const widget = node.addDOMWidget(CAMERA_WIDGET, "streamrt_camera", element, {
    serialize: false, hideOnZoom: true, margin: 4,
    getMinHeight: () => (element.offsetHeight || 220) + 8,
  });
  widget.serialize = false;
  const removed = node.onRemoved;
  node.onRemoved = function (...args) {
    camera.stop();
    return removed?.apply(this, args);
  };
  camera.refresh();
}

/** Every Stream Frame Input node of the workflow: root graph and subgraph definitions. */
function frameInputs() {
  const graph = app.rootGraph ?? app.graph;
  const graphs = [graph, ...(graph?.subgraphs?.values?.() ?? [])];
  return graphs.flatMap((g) => (g?.nodes ?? []).filter((n) => typeOf(n) === FRAME_INPUT));
}

app.registerExtension({
  name: "StreamRT.camera",

  async setup() {
    // mode 0: the node runs (not muted or bypassed)
    api.addEventListener("promptQueued", async () => {
      const idle = frameInputs().filter((node) => {
        const camera = node.streamrtCamera;
        return camera && !camera.on && !camera.userOff && (node.mode ?? 0) === 0;
      });
      if (!idle.length) return;
      let sources = {};
      try {
        sources = await (await api.fetchApi("/streamrt/frames")).json();
      } catch { /* the server's list is only a hint: start the cameras */ }
      for (const node of idle) {
        const fed = sources[String(widgetValue(node, "source") ?? "")];
        if (!(fed && fed.age_s < FED_WITHIN_S)) node.streamrtCamera.start();
      }
    });
  },

  nodeCreated(node) {
    try {
      if (typeOf(node) === FRAME_INPUT) addCamera(node);
    } catch (err) {
      console.error("[StreamRT] could not add the camera", err);
    }
  },
});

// For tests and the browser console: window.StreamRT.camera(node) is a node's camera.
globalThis.StreamRT = Object.assign(globalThis.StreamRT ?? {}, { camera: (node) => node?.streamrtCamera ?? null });
