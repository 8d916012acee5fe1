"""ComfyUI loads the pack as a custom node, and the harness drives real graphs."""

from __future__ import annotations

import pytest

REQUIRED_NODE_IDS = [
    "LoRATrainer_LoadDataset",
    "LoRATrainer_Bucketize",
    "LoRATrainer_CacheLatents",
    "LoRATrainer_ConfigureNoise",
    "LoRATrainer_ConfigureOptimizer",
    "LoRATrainer_ConfigureNetwork",
    "LoRATrainer_ConfigureSpeed",
    "LoRATrainer_TrainLoRA",
    "LoRATrainer_EMAExport",
    "LoRATrainer_LossPlot",
]


def trainer_node_ids() -> list[str]:
    import nodes

    return sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("LoRATrainer_"))


def test_pack_imports_without_errors(comfy):
    assert comfy.import_failures() == [], "\n".join(comfy.init_log())
    comfy.pack_module("nodes")  # raises if ComfyUI did not register the pack


def test_every_trainer_node_is_registered(comfy):
    missing = sorted(set(REQUIRED_NODE_IDS) - set(trainer_node_ids()))
    assert missing == [], f"not registered: {missing}"


def test_every_trainer_node_input_has_a_tooltip(comfy):
    import nodes

    ids = trainer_node_ids()
    assert ids, "no LoRATrainer_ nodes registered"
    untipped = []
    for node_id in ids:
        spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if not str(options.get("tooltip") or "").strip():
                    untipped.append(f"{node_id}.{name}")
    assert untipped == []


def ui_node(node_id: int, kind: str, inputs=(), widgets=()) -> dict:
    return {"id": node_id, "type": kind, "mode": 0, "inputs": list(inputs), "widgets_values": list(widgets)}


def slot(name: str, kind: str, link: int | None = None) -> dict:
    return {"name": name, "type": kind, "link": link}


def core_ui_workflow(ckpt_name: str) -> dict:
    """CheckpointLoaderSimple → CLIPTextEncode ×2 → EmptyLatentImage → KSampler → VAEDecode → SaveImage,
    as the browser saves it: a links table [id, from node, from slot, to node, to slot, type], and
    widgets_values in which KSampler's seed is followed by its control_after_generate value.
    """
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 4, 1, 6, 0, "CLIP"],
        [3, 4, 1, 7, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 7, 0, 3, 2, "CONDITIONING"],
        [6, 5, 0, 3, 3, "LATENT"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ]
    sampler_inputs = [
        slot("model", "MODEL", 1),
        slot("positive", "CONDITIONING", 4),
        slot("negative", "CONDITIONING", 5),
        slot("latent_image", "LATENT", 6),
        {**slot("steps", "INT"), "widget": {"name": "steps"}},  # a widget that could take a link
    ]
    nodes = [
        ui_node(4, "CheckpointLoaderSimple", widgets=[ckpt_name]),
        ui_node(6, "CLIPTextEncode", [slot("clip", "CLIP", 2)], ["a red circle, blue background"]),
        ui_node(7, "CLIPTextEncode", [slot("clip", "CLIP", 3)], ["blurry"]),
        ui_node(5, "EmptyLatentImage", widgets=[64, 64, 1]),
        # cfg 1.0: ComfyUI skips the negative pass, one UNet call per step
        ui_node(3, "KSampler", sampler_inputs, [42, "fixed", 1, 1.0, "euler", "normal", 0.9]),
        ui_node(8, "VAEDecode", [slot("samples", "LATENT", 7), slot("vae", "VAE", 8)]),
        ui_node(9, "SaveImage", [slot("images", "IMAGE", 9)], ["harness_check"]),
        ui_node(10, "Note", widgets=["not executed"]),
    ]
    return {"last_node_id": 10, "last_link_id": 9, "nodes": nodes, "links": links, "version": 0.4}


def test_ui_workflow_becomes_the_api_prompt(comfy):
    prompt = comfy.ui_workflow_to_api_prompt(core_ui_workflow("model.safetensors"))
    assert prompt == {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red circle, blue background", "clip": ["4", 1]},
        },
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 42,
                "steps": 1,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 0.9,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "harness_check", "images": ["8", 0]}},
    }


def test_ui_workflow_link_replaces_its_widget_value(comfy):
    workflow = core_ui_workflow("model.safetensors")
    workflow["nodes"].append(ui_node(11, "EmptyLatentImage", widgets=[64, 64, 1]))
    ksampler = next(n for n in workflow["nodes"] if n["id"] == 3)
    ksampler["inputs"][-1]["link"] = 10  # a (type-wrong, but it only has to be linked) link into `steps`
    workflow["links"].append({"id": 10, "origin_id": 11, "origin_slot": 0, "target_id": 3, "target_slot": 4})
    inputs = comfy.ui_workflow_to_api_prompt(workflow)["3"]["inputs"]
    assert inputs["steps"] == ["11", 0]
    assert (inputs["seed"], inputs["cfg"], inputs["denoise"]) == (42, 1.0, 0.9)


def test_ui_workflow_follows_reroutes_and_reads_primitive_values(comfy):
    workflow = core_ui_workflow("model.safetensors")
    by_id = {n["id"]: n for n in workflow["nodes"]}
    # CLIP reaches node 7 through a Reroute; KSampler's seed comes from a PrimitiveNode.
    workflow["nodes"].append(ui_node(12, "Reroute", [slot("", "*", 3)]))
    by_id[7]["inputs"][0]["link"] = 11
    workflow["links"] += [[3, 4, 1, 12, 0, "CLIP"], [11, 12, 0, 7, 0, "CLIP"], [12, 13, 0, 3, 5, "INT"]]
    workflow["links"].remove([3, 4, 1, 7, 0, "CLIP"])
    workflow["nodes"].append(ui_node(13, "PrimitiveNode", widgets=[42, "fixed"]))
    by_id[3]["inputs"].append({**slot("seed", "INT", 12), "widget": {"name": "seed"}})
    prompt = comfy.ui_workflow_to_api_prompt(workflow)
    assert prompt["7"]["inputs"]["clip"] == ["4", 1]
    assert prompt["3"]["inputs"]["seed"] == 42
    assert not {"12", "13"} & prompt.keys()


@pytest.mark.slow
def test_core_ui_workflow_runs_and_saves_an_image(comfy, sd15_checkpoint):
    prompt = comfy.ui_workflow_to_api_prompt(core_ui_workflow(sd15_checkpoint.name))
    result = comfy.run_prompt(prompt)
    assert result.success, result.describe()
    assert result.events[-1] == "execution_success"
    saved = result.outputs["9"]["images"]
    assert [image["filename"].startswith("harness_check") for image in saved] == [True]
    assert (comfy.output_dir() / saved[0]["subfolder"] / saved[0]["filename"]).is_file()


def test_invalid_prompt_reports_the_node_error(comfy):
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 0}}}
    prompt["2"] = {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}
    result = comfy.run_prompt(prompt)
    assert not result.success
    assert "1" in result.node_errors, result.describe()


class NewerPromptExecutor:
    """execution.PromptExecutor as newer releases have it (Comfy-Org/ComfyUI at cb707e9c)."""

    def __init__(self, server, cache_type=False, cache_args=None):
        self.server, self.cache_type, self.cache_args = server, cache_type, cache_args

    def ram_headroom(self) -> tuple[int, int]:
        """What execute_async reads from cache_args before it runs anything."""
        return int(self.cache_args["ram"] * (1024**3)), int(self.cache_args["ram_inactive"] * (1024**3))


def test_the_harness_builds_executors_of_either_signature(comfy):
    import execution

    kwargs = comfy.executor_cache_kwargs(NewerPromptExecutor)
    newer = NewerPromptExecutor(comfy.ServerStub(), cache_type=execution.CacheType.CLASSIC, **kwargs)
    assert newer.ram_headroom() == (0, 0)
    assert isinstance(comfy.new_executor(), execution.PromptExecutor)  # this checkout's own


class NewerBaseModel:
    """comfy/model_base.py in Comfy-Org/ComfyUI at 26adb81a: the UNet's state dict comes first."""

    def state_dict_for_saving(
        self, unet_state_dict, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None
    ):
        return {**unet_state_dict, **clip_state_dict, **vae_state_dict}


class NewerPatcher:
    """comfy/model_patcher.py at e59d85a0: the patcher builds the UNet's part."""

    model = NewerBaseModel()

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        unet = {"model.diffusion_model.w": "unet"}
        return self.model.state_dict_for_saving(
            unet, clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict
        )


class OlderBaseModel:
    """0.3.64's BaseModel reads its own UNet."""

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        return {"model.diffusion_model.w": "unet", **clip_state_dict, **vae_state_dict}


class OlderPatcher:
    model = OlderBaseModel()


def test_the_harness_saves_checkpoints_with_either_state_dict_for_saving(comfy):
    parts = {"clip_state_dict": {"clip.w": "clip"}, "vae_state_dict": {"vae.w": "vae"}}
    expected = {"model.diffusion_model.w": "unet", "clip.w": "clip", "vae.w": "vae"}
    for patcher in (NewerPatcher(), OlderPatcher()):
        assert comfy.checkpoint_state_dict(patcher, **parts) == expected, type(patcher).__name__
