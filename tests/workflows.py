"""The one validator of UI workflow files (example_workflows/*.json, as saved by the ComfyUI frontend) against a
server's /object_info, and the converter of such a workflow into the API prompt the frontend would queue.

:func:`workflow_problems` lists what is wrong with a whole workflow (``[]``: nothing):

* it is a UI workflow (version 0.4, a non-empty node list, a link list, unique ids, ``last_node_id`` /
  ``last_link_id`` not behind); every node type is known to /object_info, except the UI-only nodes of
  :data:`UI_ONLY_NODES` (each holds one text);
* every link joins existing nodes and slots, both ends list it, and its types match ComfyUI's rule;
* every required non-widget input (a socket) is connected; the saved outputs and input slots are the node's;
* ``widgets_values`` match the node's widget inputs (in /object_info ``input_order``) in count, type and range,
  with the extra values this frontend saves (:func:`widget_layout`).

Plain functions, imported as a top-level module (``from workflows import workflow_problems``). Used by
tests/test_example_workflows.py (every example), tests/test_browser_e2e.py (the realtime example) and
tests/test_engines_e2e.py (the engine build example).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: frontend-only nodes: not in /object_info, not sent to the server; each has one text widget
UI_ONLY_NODES = {"Note", "MarkdownNote"}
#: combos whose options are the user's own files: a saved value need not be among this server's options
USER_FILE_COMBOS = {("StreamRTLoadPipeline", "model"), ("StreamRTLoadPipeline", "taesd"),
                    ("StreamRTLora", "lora_name"), ("CheckpointLoaderSimple", "ckpt_name"),
                    ("VAELoader", "vae_name"), ("LoraLoader", "lora_name"), ("ControlNetLoader", "control_net_name")}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
#: input types the frontend makes a widget for (a list of options is a combo too)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "WEBCAM")


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's widgets_values: a widget input, or an extra widget the frontend adds."""

    name: str
    kind: Any  # the input type ("INT", "COMBO", an options list, "WEBCAM"), or "CONTROL" / "BUTTON"
    opts: dict = field(default_factory=dict)
    is_input: bool = True


# --------------------------------------------------------------------------------------------------
# /object_info entries


def declared_inputs(spec: dict) -> tuple[dict, list[str]]:
    """{name: input spec} and the input order (required, then optional) of an /object_info entry."""
    declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
    order = spec["input_order"].get("required", []) + spec["input_order"].get("optional", [])
    return declared, order


def spec_opts(spec: list) -> dict:
    """The options dict of an input spec (``{}`` when it has none)."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_combo(kind: Any) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def is_widget_input(spec: list) -> bool:
    """Whether the frontend makes a widget for an input spec of /object_info (by its type)."""
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def is_widget(spec: list) -> bool:
    """Whether an input is a widget in a saved workflow: a widget type (:func:`is_widget_input`), not forceInput."""
    return is_widget_input(spec) and not spec_opts(spec).get("forceInput")


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule: equal, a wildcard, or overlapping comma-separated unions."""
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def ui_input_type(spec: list) -> str:
    """The type the frontend writes for an input slot (a list of options is "COMBO")."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


# --------------------------------------------------------------------------------------------------
# widgets_values


def widget_layout(spec: dict) -> list[WidgetSlot]:
    """What a node of this /object_info entry saves in widgets_values, in order (frontend 1.32.9):

    one value per widget input in input_order; after an INT with ``control_after_generate`` (on by
    default for inputs named seed / noise_seed) or a combo with it, the control mode ("fixed", ...);
    after a combo with image/video/audio_upload the upload button's value; a WEBCAM input adds the
    "capture" button at the end.
    """
    declared, order = declared_inputs(spec)
    slots: list[WidgetSlot] = []
    trailing: list[WidgetSlot] = []
    for name in order:
        if not is_widget(declared[name]):
            continue
        kind, opts = declared[name][0], spec_opts(declared[name])
        slots.append(WidgetSlot(name, kind, opts))
        if (kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed"))) or (
                is_combo(kind) and opts.get("control_after_generate")):
            slots.append(WidgetSlot(f"{name}.control_after_generate", "CONTROL", is_input=False))
        if is_combo(kind) and any(opts.get(flag) for flag in UPLOAD_FLAGS):
            slots.append(WidgetSlot("upload", "BUTTON", is_input=False))
        if kind == "WEBCAM":
            trailing.append(WidgetSlot("capture", "BUTTON", is_input=False))
    return slots + trailing


def widget_problems(node: dict, spec: dict) -> list[str]:
    """What is wrong with a node's widgets_values, or [] (count, then each value's type and range)."""
    where = f"node {node['id']} ({node['type']})"
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        return [f"{where}: widgets_values is not a list: {values!r}"]
    layout = widget_layout(spec)
    if len(values) != len(layout):
        return [f"{where}: {len(values)} widgets_values {values!r} but the node has {len(layout)} widgets "
                f"{[s.name for s in layout]}"]
    problems = []
    for slot, value in zip(layout, values):
        what = f"{where}.{slot.name} = {value!r}"
        lo, hi = slot.opts.get("min"), slot.opts.get("max")
        if slot.kind == "CONTROL":
            ok = value in CONTROL_VALUES
        elif slot.kind == "BUTTON":
            ok = value is None or isinstance(value, str)
        elif slot.kind == "INT":
            ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and (
                hi is None or value <= hi)
        elif slot.kind == "FLOAT":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                lo is None or value >= lo) and (hi is None or value <= hi)
        elif slot.kind == "BOOLEAN":
            ok = isinstance(value, bool)
        elif slot.kind in ("STRING", "WEBCAM"):
            ok = isinstance(value, str)
        elif is_combo(slot.kind):
            options = slot.kind if isinstance(slot.kind, list) else slot.opts.get("options", [])
            user_file = ((node["type"], slot.name) in USER_FILE_COMBOS
                         or any(slot.opts.get(flag) for flag in UPLOAD_FLAGS))
            ok = isinstance(value, (str, int, float)) and (value in options or (user_file and isinstance(value, str)
                                                                                 and value not in ("", "undefined")))
        else:
            ok = False
            what += f" (unknown widget type {slot.kind!r})"
        if not ok:
            problems.append(what + f" does not fit {slot.kind!r} {slot.opts or ''}")
    return problems


def widget_values_by_name(node: dict, spec: dict) -> dict[str, Any]:
    """The node's widget inputs {name: saved value} (extras such as buttons left out)."""
    return {slot.name: value for slot, value in zip(widget_layout(spec), node.get("widgets_values", []))
            if slot.is_input}


# --------------------------------------------------------------------------------------------------
# the whole workflow


def unknown_node_types(workflow: dict, info: dict) -> set[str]:
    """Node types of the workflow that /object_info does not list (UI-only nodes left out)."""
    nodes = workflow.get("nodes")
    if not isinstance(nodes, list):
        return set()
    return {n["type"] for n in nodes} - set(info) - UI_ONLY_NODES


def structure_problems(workflow: dict) -> list[str]:
    """What makes the file no UI workflow of this frontend: version, node and link lists, ids."""
    problems = []
    if workflow.get("version") != 0.4:
        problems.append(f"version {workflow.get('version')!r}, not 0.4")
    if not (isinstance(workflow.get("nodes"), list) and workflow["nodes"]):
        problems.append("no list of nodes")
    if not isinstance(workflow.get("links"), list):
        problems.append("no list of links")
    if problems:
        return problems
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        problems.append("duplicate node ids")
    if not workflow.get("last_node_id", -1) >= max(nodes):
        problems.append(f"last_node_id {workflow.get('last_node_id')!r} is below the largest node id {max(nodes)}")
    links = {link[0]: link for link in workflow["links"]}
    if len(links) != len(workflow["links"]):
        problems.append("duplicate link ids")
    if links and not workflow.get("last_link_id", -1) >= max(links):
        problems.append(f"last_link_id {workflow.get('last_link_id')!r} is below the largest link id {max(links)}")
    return problems


def link_problems(workflow: dict, info: dict) -> list[str]:
    """Links that do not join existing nodes and slots, that one end does not list, or whose types do not match."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    problems: list[str] = []
    for link in workflow["links"]:
        if len(link) != 6:
            problems.append(f"link {link}: not [id, origin, origin slot, target, target slot, type]")
            continue
        lid, src_id, src_slot, dst_id, dst_slot, link_type = link
        src, dst = nodes.get(src_id), nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {link}: node {src_id if src is None else dst_id} does not exist")
            continue
        if src["type"] in UI_ONLY_NODES or dst["type"] in UI_ONLY_NODES:
            problems.append(f"link {link}: joins a UI-only node")
            continue
        outputs = info[src["type"]]["output"]
        if not (0 <= src_slot < len(outputs) and src_slot < len(src.get("outputs", []))):
            problems.append(f"link {link}: {src['type']} has no output {src_slot}")
            continue
        out = src["outputs"][src_slot]
        if lid not in (out.get("links") or []):
            problems.append(f"link {link}: not listed in {src['type']}.outputs[{src_slot}].links")
        if out["type"] != outputs[src_slot]:
            problems.append(f"link {link}: {src['type']} output {src_slot} is {outputs[src_slot]}, saved {out['type']}")
        if not 0 <= dst_slot < len(dst.get("inputs", [])):
            problems.append(f"link {link}: {dst['type']} has no input slot {dst_slot}")
            continue
        slot = dst["inputs"][dst_slot]
        declared, _ = declared_inputs(info[dst["type"]])
        if slot.get("link") != lid:
            problems.append(f"link {link}: {dst['type']}.{slot['name']} holds link {slot.get('link')}")
        if slot["name"] not in declared:
            problems.append(f"link {link}: {dst['type']} has no input {slot['name']}")
            continue
        in_type = ui_input_type(declared[slot["name"]])
        if not types_match(outputs[src_slot], in_type):
            problems.append(f"link {link}: {outputs[src_slot]} into {dst['type']}.{slot['name']} ({in_type})")
        if link_type != in_type or slot["type"] != in_type:
            problems.append(f"link {link}: type {link_type} / slot type {slot['type']}, input is {in_type}")
    return problems


def node_problems(node: dict, links: dict, info: dict) -> list[str]:
    """What is wrong with one node: dangling link ids, unconnected required sockets, slots that are not the
    node's, and its widgets_values (``links``: the workflow's links by id)."""
    where = f"node {node['id']} ({node['type']})"
    problems = []
    for slot in node.get("inputs", []):
        if slot.get("link") is not None and slot["link"] not in links:
            problems.append(f"{where}.{slot['name']}: link {slot['link']} does not exist")
    for out in node.get("outputs", []):
        for lid in out.get("links") or []:
            if lid not in links:
                problems.append(f"{where}.{out['name']}: link {lid} does not exist")
    if node["type"] in UI_ONLY_NODES:
        values = node.get("widgets_values")
        if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) and values[0]):
            problems.append(f"{where}: a note with one text, got {values!r}")
        return problems
    spec = info[node["type"]]
    declared, _ = declared_inputs(spec)
    # every required non-widget input (a socket) is connected: the server would refuse the prompt
    connected = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    for name in spec["input_order"].get("required", []):
        if not is_widget(declared[name]) and name not in connected:
            problems.append(f"{where}: required input {name} is not connected")
    # the saved slots are this node's: outputs in order, inputs by name
    saved_outputs = [o["type"] for o in node.get("outputs", [])]
    if saved_outputs != list(spec["output"]):
        problems.append(f"{where}: outputs {saved_outputs}, the node has {spec['output']}")
    extras = {s.name for s in widget_layout(spec) if not s.is_input}
    for slot in node.get("inputs", []):
        if slot["name"] not in declared and slot["name"] not in extras:
            problems.append(f"{where}: unknown input slot {slot['name']}")
    return problems + widget_problems(node, spec)


def workflow_problems(workflow: dict, info: dict) -> list[str]:
    """Everything wrong with a UI workflow against a server's /object_info (see the module docstring), or []."""
    problems = structure_problems(workflow)
    if problems:
        return problems
    unknown = unknown_node_types(workflow, info)
    if unknown:
        return [f"node types unknown to the server: {sorted(unknown)} (UI-only nodes allowed: {sorted(UI_ONLY_NODES)})"]
    links = {link[0]: link for link in workflow["links"]}
    problems += link_problems(workflow, info)
    for node in workflow["nodes"]:
        problems += node_problems(node, links, info)
    return problems


# --------------------------------------------------------------------------------------------------
# UI workflow -> API prompt


def to_api_prompt(workflow: dict, info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes of a (flat, all-active) UI workflow:
    widget inputs from widgets_values in input_order, links as ``[origin id, slot]``, UI-only nodes dropped."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} is muted or bypassed (mode {node['mode']})")
        inputs = widget_values_by_name(node, info[node["type"]])
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def linked_from(workflow: dict, node: dict, input_name: str) -> tuple[dict, int]:
    """The node and output slot that feed ``node``'s input ``input_name``."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    (slot,) = [s for s in node.get("inputs", []) if s["name"] == input_name]
    _, source, source_slot, *_ = links[slot["link"]]
    return nodes[source], source_slot
