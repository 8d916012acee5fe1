"""The shipped workflows still load: node ids, input names and widget order are a contract.

A saved workflow names each node by its id (`type`), each linked input by its name, and keeps
its widget values by position. Renaming an id or an input, or adding, removing or reordering a
widget, breaks every graph users saved; display names may change. Each node of
workflows/*.json is checked against the schema ComfyUI registered for it (this pack's or
ComfyUI's own).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
SD15_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "sd15_train_then_sample.json"
# combos whose options are the files of one installation (checkpoints, input folders, states)
FILE_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("UNETLoader", "unet_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("VAELoader", "vae_name"),
    ("LoRATrainer_LoadDataset", "folder"),
    ("LoRATrainer_LoadDataset", "regularization_folder"),
    ("LoRATrainer_TrainLoRA", "resume_from"),
    *(("LoRATrainer_MergeLoRAs", f"lora_{i}") for i in range(1, 5)),
}


def _inputs(node_class) -> dict[str, tuple]:
    spec = node_class.INPUT_TYPES()
    return {
        name: entry
        for section in ("required", "optional")
        for name, entry in (spec.get(section) or {}).items()
    }


def _fits(entry: tuple, value) -> bool:
    kind = entry[0]
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(kind, list) or kind == "COMBO":
        return value in (kind if isinstance(kind, list) else options.get("options", []))
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    number = int if kind == "INT" else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        return False
    return options.get("min", value) <= value <= options.get("max", value)


def _problems(comfy, workflow: dict) -> list[str]:
    import nodes

    problems = []
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in comfy.VIRTUAL_NODES:
            continue
        where = f"node {node['id']} ({kind})"
        if kind not in nodes.NODE_CLASS_MAPPINGS:
            problems.append(f"{where}: no node of this id is registered")
            continue
        node_class = nodes.NODE_CLASS_MAPPINGS[kind]
        inputs = _inputs(node_class)
        for slot in node.get("inputs") or []:
            entry = inputs.get(slot["name"])
            if entry is None:
                problems.append(f"{where}: input {slot['name']!r} is not in the schema")
            elif "widget" not in slot and entry[0] != slot["type"] and slot["type"] != "*":
                problems.append(
                    f"{where}: input {slot['name']!r} is {entry[0]}, the workflow links {slot['type']}"
                )
        returns = list(node_class.RETURN_TYPES)
        for index, slot in enumerate(node.get("outputs") or []):
            schema_type = returns[index] if index < len(returns) else None
            if schema_type != slot["type"]:
                problems.append(f"{where}: output {index} is {schema_type}, the workflow has {slot['type']}")
        saved = node.get("widgets_values") or []
        slots = comfy._widget_slots(node_class)
        if len(saved) != sum(1 + helpers for _, helpers in slots):
            names = [name for name, _ in slots]
            problems.append(f"{where}: {len(saved)} widget values saved, the schema's widgets are {names}")
            continue
        for name, value in comfy._widget_values(node_class, saved).items():
            ok = isinstance(value, str) if (kind, name) in FILE_COMBOS else _fits(inputs[name], value)
            if not ok:
                problems.append(f"{where}: widget {name!r} cannot hold the saved value {value!r}")
    return problems


def test_the_repository_ships_workflows():
    assert {p.name for p in WORKFLOWS} >= {"sd15_train_then_sample.json", "sdxl_train_then_sample.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_node_input_and_widget_of_a_shipped_workflow_is_in_the_schemas(comfy, path):
    assert _problems(comfy, json.loads(path.read_text(encoding="utf-8"))) == []


def test_a_renamed_input_and_a_missing_widget_are_caught(comfy):
    workflow = json.loads(SD15_WORKFLOW.read_text(encoding="utf-8"))
    by_type = {node["type"]: node for node in workflow["nodes"]}
    by_type["LoRATrainer_Bucketize"]["inputs"][0]["name"] = "data_set"
    by_type["LoRATrainer_ConfigureNoise"]["widgets_values"].pop()
    by_type["LoRATrainer_Bucketize"]["widgets_values"][0] = "512"
    by_type["LoRATrainer_TrainLoRA"]["type"] = "LoRATrainer_TrainLora"
    problems = _problems(comfy, workflow)
    assert any("input 'data_set' is not in the schema" in p for p in problems), problems
    assert any("(LoRATrainer_ConfigureNoise): 17 widget values saved" in p for p in problems), problems
    assert any("(LoRATrainer_TrainLora): no node of this id" in p for p in problems), problems
    assert any("widget 'resolution' cannot hold the saved value '512'" in p for p in problems), problems


CONFIG_NODES = (
    "LoRATrainer_ConfigureNoise",
    "LoRATrainer_ConfigureOptimizer",
    "LoRATrainer_ConfigureNetwork",
    "LoRATrainer_ConfigureFlow",
    "LoRATrainer_ConfigureSpeed",
)
# what each shipped workflow configures: SD's noise options, Flux's flow options
WORKFLOW_CONFIG_NODES = {
    "sd15_train_then_sample": CONFIG_NODES[:3],
    "sdxl_train_then_sample": CONFIG_NODES[:3],
    "flux_train_then_sample": (*CONFIG_NODES[1:3], "LoRATrainer_ConfigureFlow"),
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_the_config_nodes_of_a_shipped_workflow_build_their_configs(comfy, path):
    import nodes

    prompt = comfy.ui_workflow_to_api_prompt(json.loads(path.read_text(encoding="utf-8")))
    built = [node for node in prompt.values() if node["class_type"] in CONFIG_NODES]
    assert {node["class_type"] for node in built} == set(WORKFLOW_CONFIG_NODES[path.stem])
    for node in built:  # every saved widget reaches a config field, and the values pass its checks
        nodes.NODE_CLASS_MAPPINGS[node["class_type"]].execute(**node["inputs"])
