"""A user's path in the real frontend: open each shipped workflow, look at our nodes, train.

The training run uses the shipped SD1.5 workflow as loaded in the browser, with its
widgets turned down through the frontend's own widget objects (`set_widgets`: value +
callback, as typing would) so it finishes on a CPU: 64 px buckets, 2 steps, 2 sampler
steps, one 64x64 validation sample of 2 steps. Nothing else in the graph is changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
SD15_WORKFLOW = PACK_DIR / "workflows" / "sd15_train_then_sample.json"
PREFIX = "LoRATrainer_"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Helper widgets the frontend adds after a widget; their values are saved in the workflow.
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
HELPER_WIDGETS = {"control_after_generate", "control_filter_list"}
# Combo values that name the user's own files: a shipped workflow names what the user will have.
USER_FILE_COMBOS = {("LoRATrainer_LoadDataset", "folder")} | {
    ("LoRATrainer_MergeLoRAs", f"lora_{i}") for i in range(1, 5)
}
RUN_TIMEOUT_S = 1500  # the full-size UNet on 2 CPU cores: ~3 min here; checkpoint loads dominate


def _widget_inputs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of the inputs the frontend shows as widgets, in its order."""
    order = spec.get("input_order") or {s: list(spec["input"].get(s) or {}) for s in ("required", "optional")}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section) or []:
            entry = spec["input"][section][name]
            kind = "COMBO" if isinstance(entry[0], list) else entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                widgets.append((name, kind, options))
    return widgets


def _value_problem(kind: str, options: dict, value, entry) -> str | None:
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{value!r} is not a number"
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{value!r} is outside {low}..{high}"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    elif kind == "COMBO":
        choices = entry[0] if isinstance(entry[0], list) else options.get("options", [])
        if value not in choices:
            return f"{value!r} is not one of {choices}"
    return None


def widget_problems(node, spec: dict) -> list[str]:
    """What a user would see wrong in one of our nodes: missing/extra widgets, values of the wrong kind."""
    expected = _widget_inputs(spec)
    shown = [(name, value) for name, _, value in node.widgets if name not in HELPER_WIDGETS]
    where = f"node {node.id} ({node.type})"
    if [name for name, _ in shown] != [name for name, _, _ in expected]:
        return [f"{where}: widgets {[n for n, _ in shown]}, expected {[n for n, _, _ in expected]}"]
    problems = []
    for (name, value), (_, kind, options) in zip(shown, expected, strict=True):
        if (node.type, name) in USER_FILE_COMBOS:
            continue
        section = "required" if name in (spec["input"].get("required") or {}) else "optional"
        problem = _value_problem(kind, options, value, spec["input"][section][name])
        if problem:
            problems.append(f"{where}: {name} = {problem}")
    for name, _, value in node.widgets:
        if name == "control_after_generate" and value not in CONTROL_VALUES:
            problems.append(f"{where}: control_after_generate = {value!r} (values shifted by one widget?)")
    return problems


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_with_every_node_known_and_every_widget_value_in_place(
    comfy_page, object_info, workflow: Path, artifacts
):
    comfy_page.load_workflow(workflow)
    comfy_page.frame_graph()
    comfy_page.screenshot(artifacts / f"graph_loaded_{workflow.stem}.png")

    nodes = comfy_page.nodes()
    assert not [d for d in comfy_page.dialogs() if "Missing" in d], comfy_page.dialogs()
    assert [(n.id, n.type) for n in nodes if not n.registered or n.has_errors] == []
    ours = [n for n in nodes if n.type.startswith(PREFIX)]
    assert ours, f"{workflow.name} has none of this pack's nodes"
    problems = [p for n in ours for p in widget_problems(n, object_info[n.type])]
    assert problems == []
    assert comfy_page.errors_since_startup == []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_nodes_do_not_overlap_on_the_canvas(comfy_page, workflow: Path):
    # Boxes as the frontend sizes them (a node grows to fit its widgets), title bars included.
    comfy_page.load_workflow(workflow)
    overlaps = comfy_page.overlapping_nodes()
    assert overlaps == [], f"nodes drawn over each other: {overlaps}"


def test_every_pack_node_renders_its_widgets_with_tooltips(comfy_page, object_info, pack_nodes, artifacts):
    ours = sorted(t for t in object_info if t.startswith(PREFIX))
    assert set(ours) >= pack_nodes, f"not registered: {sorted(pack_nodes - set(ours))}"
    comfy_page.add_nodes(ours)
    comfy_page.frame_graph()
    comfy_page.screenshot(artifacts / "all_pack_nodes.png")

    nodes = {n.type: n for n in comfy_page.nodes()}
    assert sorted(nodes) == ours
    problems = [p for t in ours for p in widget_problems(nodes[t], object_info[t])]
    for t in ours:
        spec = object_info[t]
        if not spec.get("description"):
            problems.append(f"{t}: no description")
        for section in ("required", "optional"):
            for name, entry in (spec["input"].get(section) or {}).items():
                if len(entry) < 2 or not entry[1].get("tooltip"):
                    problems.append(f"{t}.{name}: no tooltip")
        if not all(spec.get("output_tooltips") or [None]):
            problems.append(f"{t}: an output has no tooltip")
    assert problems == []
    # The tooltip really shows on hover: the first widget of each node that has widgets.
    shown = {}
    for t in ours:
        widgets = _widget_inputs(object_info[t])
        if widgets:
            name, _, options = widgets[0]
            shown[t] = (comfy_page.hover_widget_tooltip(nodes[t].id, name), options["tooltip"])
    assert {t: s for t, (s, want) in shown.items() if s.strip() != want.strip()} == {}
    assert comfy_page.errors_since_startup == []


def _tiny_run(comfy_home) -> dict:
    """Widget values (by node type) that make the SD1.5 workflow finish on a CPU in minutes."""
    return {
        "CheckpointLoaderSimple": {"ckpt_name": comfy_home.checkpoint},
        "LoRATrainer_LoadDataset": {"folder": comfy_home.dataset, "default_repeats": 1},
        "LoRATrainer_Bucketize": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
        "LoRATrainer_TrainLoRA": {
            "max_train_steps": 2,
            "train_batch_size": 1,
            "lora_name": "e2e_sd15",
            "sample_prompts": "a red circle, flat colors --n blurry --w 64 --h 64 --s 2 --l 7",
        },
        "LoRATrainer_EMAExport": {"lora_name": "e2e_sd15_ema"},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
        "SaveImage": {"filename_prefix": "e2e_sd15"},
    }


def test_sd15_workflow_trains_in_the_browser_with_progress_loss_plot_and_saved_lora(
    comfy_page, comfy_home, artifacts
):
    from safetensors import safe_open

    comfy_page.load_workflow(SD15_WORKFLOW)
    comfy_page.set_widgets(_tiny_run(comfy_home))
    train_node = str(next(n.id for n in comfy_page.nodes() if n.type == "LoRATrainer_TrainLoRA"))
    plot_node = next(n.id for n in comfy_page.nodes() if n.type == "LoRATrainer_LossPlot")
    comfy_page.frame_graph()
    comfy_page.click_run()

    comfy_page.wait_for_message(
        lambda m: m["type"] == "progress" and str(m["data"].get("node")) == train_node,
        RUN_TIMEOUT_S,
        "training progress",
    )
    comfy_page.screenshot(artifacts / "training_in_progress_sd15.png")
    finished = comfy_page.wait_until_finished(RUN_TIMEOUT_S)
    assert finished["type"] == "execution_success", _describe_failure(comfy_page)

    progress = comfy_page.progress(train_node)
    steps = [value for value, _ in progress]
    assert steps == sorted(set(steps)) and steps[-1] == progress[-1][1] == 2, progress
    assert comfy_page.binary_frames > 0, "no live loss-plot preview was sent"
    comfy_page.page.wait_for_function(
        "(id) => (app.graph.getNodeById(id).imgs || []).some(i => i.complete && i.naturalWidth > 0)",
        arg=plot_node,
        timeout=30_000,
    )
    saved = comfy_home.loras / "e2e_sd15.safetensors"
    assert saved.is_file(), sorted(p.name for p in comfy_home.loras.iterdir())
    with safe_open(str(saved), "pt") as lora:
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in lora.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert (comfy_home.loras / "e2e_sd15_ema.safetensors").is_file()
    assert comfy_page.dialogs() == []

    comfy_page.open_queue_panel()  # the finished job, its time and outputs
    comfy_page.frame_graph()
    comfy_page.screenshot(artifacts / "after_run_sd15.png")
    assert comfy_page.errors_since_startup == []


def _describe_failure(comfy_page) -> str:
    errors = [m["data"] for m in comfy_page.messages if m["type"] == "execution_error"]
    slim = [{k: e.get(k) for k in ("node_type", "exception_type", "exception_message")} for e in errors]
    return f"execution failed: {slim}; dialogs: {comfy_page.dialogs()}"
