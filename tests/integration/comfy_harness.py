"""A real ComfyUI, in-process, for the integration tests (facts: notes "comfy_api.md" §9, §12).

`setup_comfy` starts ComfyUI the way `main.py` does (CPU, throw-away input/output/temp
folders, only this pack as a custom node), after which `nodes`, `execution` and
`comfy.*` are importable. `run_prompt` validates and executes an API-format prompt
with a stand-in for the web server; `ui_workflow_to_api_prompt` turns a workflow saved
from the browser into that format. `make_sd15_checkpoint` writes a random-weight
checkpoint of the real SD1.5 architecture plus the same weights as a diffusers folder
(the parity fixture), cached across sessions because it takes about a minute.

Nothing here imports ComfyUI at module level: the plain CPU venv imports this file
while collecting (and skipping) the integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

PACK_DIR = Path(__file__).resolve().parents[2]  # the repository root is the node pack
DATASET_NAME = "lora_test_dataset"
CHECKPOINT_RECIPE = "v1"  # bump when make_sd15_checkpoint changes what it writes
_STATE: dict[str, Any] = {}  # filled once by setup_comfy


# --- start-up --------------------------------------------------------------------------------------


def setup_comfy(comfyui_dir: str | Path, base_dir: str | Path) -> None:
    """Initialise ComfyUI in this process, once; later calls return at once.

    Mirrors main.py: `--cpu`, input/output/temp under `base_dir`, every custom node
    disabled except this pack (found by adding the pack's parent folder to the
    custom_nodes paths), `models/loras` and `models/checkpoints` under `base_dir` as the
    default model folders, then `nodes.init_extra_nodes`.
    """
    if _STATE:
        return
    comfyui_dir, base = Path(comfyui_dir).resolve(), Path(base_dir).resolve()
    if not (comfyui_dir / "nodes.py").is_file() or not (comfyui_dir / "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_DIR={comfyui_dir} is not a ComfyUI checkout (no nodes.py / comfy/)")
    dirs = {name: base / name for name in ("output", "input", "temp")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    saved_argv = sys.argv
    sys.argv = [
        "main.py",
        "--cpu",
        *("--output-directory", str(dirs["output"]), "--input-directory", str(dirs["input"])),
        *("--temp-directory", str(dirs["temp"])),
        *("--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_DIR.name),
    ]
    # ComfyUI's `nodes`/`utils` must win over this repo's `nodes/` package (cwd is on sys.path).
    sys.path.insert(0, str(comfyui_dir))
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # parses sys.argv now
    finally:
        sys.argv = saved_argv
    import folder_paths

    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.add_model_folder_path("custom_nodes", str(PACK_DIR.parent))
    for kind in ("loras", "checkpoints"):
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(base / "models" / kind), is_default=True)
    # main.py imports this before `nodes`: nodes.py puts comfy/ first on sys.path, after which
    # `utils` would be comfy/utils.py.
    import utils.extra_config  # noqa: F401

    import nodes

    if Path(nodes.__file__).resolve() != comfyui_dir / "nodes.py":
        raise RuntimeError(f"`import nodes` found {nodes.__file__}, not ComfyUI's nodes.py")
    # The per-pack import report is logged at INFO level only.
    with capture_logs(logging.INFO) as log:
        builtin_failures = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _STATE.update(comfyui_dir=comfyui_dir, base_dir=base, init_log=log, builtin_failures=builtin_failures)


def _require_setup() -> None:
    if not _STATE:
        raise RuntimeError("call setup_comfy() first (the `comfy` fixture does)")


def import_failures() -> list[str]:
    """Custom-node paths that ComfyUI reported as "(IMPORT FAILED)" during setup.

    0.3.64 keeps no list of failed custom nodes: `init_external_custom_nodes` only logs
    them (nodes.py:2235-2242), so this reads setup's log. The reasons (tracebacks) are in
    `init_log()`.
    """
    _require_setup()
    return [m.group(1) for line in _STATE["init_log"] if (m := re.search(r"\(IMPORT FAILED\): (.+)$", line))]


def init_log() -> list[str]:
    """Everything logged at INFO or above while ComfyUI loaded its nodes and this pack."""
    _require_setup()
    return list(_STATE["init_log"])


def input_dir() -> Path:
    _require_setup()
    return _STATE["base_dir"] / "input"


def output_dir() -> Path:
    _require_setup()
    return _STATE["base_dir"] / "output"


def models_dir(kind: str) -> Path:
    """`models/<kind>` under the base dir; "loras" and "checkpoints" are ComfyUI's defaults."""
    _require_setup()
    return _STATE["base_dir"] / "models" / kind


def pack_module(name: str) -> ModuleType:
    """A submodule of this pack (e.g. "nodes.comfy_backend") as ComfyUI loaded it.

    ComfyUI registers a pack in sys.modules under its path with "." replaced by "_x_"
    (nodes.py:2117), so the pack's relative imports resolve inside that package; importing
    the submodule through it gives the same module objects the nodes use.
    """
    _require_setup()
    package = os.path.join(str(PACK_DIR.parent), PACK_DIR.name).replace(".", "_x_")
    if package not in sys.modules:
        raise RuntimeError(f"ComfyUI did not load the pack {package}; import_failures(): {import_failures()}")
    return importlib.import_module(f"{package}.{name}")


@contextlib.contextmanager
def capture_logs(level: int = logging.WARNING) -> Iterator[list[str]]:
    """Collect the messages logged at `level` or above, e.g. "lora key not loaded: …" (lora.py:93)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = logging.getLogger()
    handler, saved_level = _Collect(level), root.level
    root.addHandler(handler)
    root.setLevel(min(saved_level or level, level))
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)


# --- running prompts -----------------------------------------------------------------------------


class ServerStub:
    """What PromptExecutor and progress reporting call on the web server (notes §9)."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple[str, Any]] = []
        self.progress_texts: list[tuple[str, str]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.progress_texts.append((str(node_id), text.decode() if isinstance(text, bytes) else text))

    def queue_updated(self) -> None:
        pass


@dataclass
class Result:
    """One prompt run. `error` is validate_prompt's error or the execution_error message data."""

    success: bool
    outputs: dict = field(default_factory=dict)  # history_result["outputs"]: node id → UI output
    status_messages: list = field(default_factory=list)  # [(event, data)], e.g. "execution_success"
    node_errors: dict = field(default_factory=dict)  # validate_prompt's per-node errors
    error: dict | None = None
    server: ServerStub | None = None

    @property
    def events(self) -> list[str]:
        return [event for event, _ in self.status_messages]

    def describe(self) -> str:
        """A failure summary for assertion messages."""
        return json.dumps({"error": self.error, "node_errors": self.node_errors}, indent=1, default=str)


def run_prompt(prompt: dict, executor=None) -> Result:
    """Validate and execute an API-format prompt, as the queue would (no web server).

    Pass an executor from `new_executor()` to keep ComfyUI's output cache between runs;
    by default every run starts cold.
    """
    _require_setup()
    import execution
    import server

    prompt_id = str(uuid.uuid4())
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok:
        return Result(False, node_errors=node_errors, error=error)
    cold = executor is None
    executor = executor or new_executor()
    stub = executor.server
    # Nodes reach the server through PromptServer.instance (progress text, previews).
    had_instance = hasattr(server.PromptServer, "instance")
    saved = getattr(server.PromptServer, "instance", None)
    server.PromptServer.instance = stub
    try:
        executor.execute(prompt, prompt_id, {}, outputs)
    finally:
        if had_instance:
            server.PromptServer.instance = saved
        else:
            del server.PromptServer.instance
    failure = next((data for event, data in executor.status_messages if event == "execution_error"), None)
    result = Result(
        executor.success,
        outputs=executor.history_result["outputs"],
        status_messages=list(executor.status_messages),
        node_errors=node_errors,
        error=failure,
        server=stub,
    )
    if cold:  # free the run's models now, not at some later gc: tests load several 4 GB models
        del executor
        _release_models()
    return result


def _release_models() -> None:
    import comfy.model_management as mm

    gc.collect()
    mm.cleanup_models()
    mm.soft_empty_cache()


def new_executor():
    """ComfyUI's PromptExecutor with the classic cache, on a ServerStub."""
    import execution

    cache = executor_cache_kwargs(execution.PromptExecutor)
    return execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC, **cache)


def executor_cache_kwargs(executor_class) -> dict:
    """The cache keyword `executor_class` takes besides cache_type, read from its signature.

    0.3.64 takes `cache_size`; newer releases take `cache_args`, a dict whose "ram" and
    "ram_inactive" entries execute_async reads unconditionally (main.py builds it with "lru"
    too; execution.py in Comfy-Org/ComfyUI at cb707e9c). None of them matter to the classic cache.
    """
    parameters = inspect.signature(executor_class).parameters
    if "cache_args" in parameters:
        return {"cache_args": {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}}
    if "cache_size" in parameters:
        return {"cache_size": None}
    return {}


# --- UI workflow → API prompt --------------------------------------------------------------------

VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, never executed
MODE_MUTED, MODE_BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_workflow_to_api_prompt(workflow: dict) -> dict:
    """The API prompt ({id: {"class_type", "inputs"}}) for a workflow saved from the browser.

    Widget values are matched by position to the node class's widget inputs (required, then
    optional, in INPUT_TYPES order); link-connected widgets keep their slot but take the link.
    The frontend adds unserialised helper widgets whose values are still saved: one
    "control_after_generate" after an INT with that option, or, lacking the option, named
    seed/noise_seed (ComfyUI_frontend useIntWidget.ts, litegraphUtil.ts migrateWidgetsValues);
    control + filter list after a COMBO with the option; the upload button after an
    image_upload COMBO. Links through Reroute nodes are followed; a PrimitiveNode's value is
    already in its target's widget. Muted nodes are left out; bypassed ones are refused.
    """
    _require_setup()
    import nodes

    links = {row[0]: row[1:] for row in map(_link_row, workflow.get("links", []))}
    by_id = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASSED:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed; bypass is not supported here")
        if node["type"] not in nodes.NODE_CLASS_MAPPINGS:
            raise ValueError(f"node {node['id']}: no node class {node['type']!r} is registered")
        linked = {}
        for slot in node.get("inputs") or []:
            source = _link_source(slot.get("link"), links, by_id)
            if source is not None:
                linked[slot["name"]] = source
        values = _widget_values(nodes.NODE_CLASS_MAPPINGS[node["type"]], node.get("widgets_values") or [])
        inputs = {name: value for name, value in values.items() if name not in linked}
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": {**inputs, **linked}}
    return prompt


def _link_row(link) -> list:
    """[id, origin_id, origin_slot, target_id, target_slot, type] from either saved link format."""
    if isinstance(link, dict):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        return [link.get(k) for k in keys]
    return list(link)


def _link_source(link_id, links: dict, by_id: dict) -> list | None:
    """[origin node id, output slot] of a link, through Reroutes; None for no link or a widget source."""
    while link_id is not None:
        origin_id, origin_slot = links[link_id][0], links[link_id][1]
        origin = by_id[origin_id]
        if origin["type"] == "Reroute":
            link_id = (origin.get("inputs") or [{}])[0].get("link")
            continue
        if origin["type"] == "PrimitiveNode" or origin.get("mode", 0) == MODE_MUTED:
            return None
        return [str(origin_id), origin_slot]
    return None


def _widget_values(node_class, saved: list | dict) -> dict:
    if isinstance(saved, dict):  # some custom nodes save {name: value}
        return dict(saved)
    values, position = {}, 0
    for name, helpers in _widget_slots(node_class):
        if position >= len(saved):
            break
        values[name] = saved[position]
        position += 1 + helpers
    return values


def _widget_slots(node_class) -> list[tuple[str, int]]:
    """(widget input name, number of helper widgets saved after it), in the frontend's order."""
    spec = node_class.INPUT_TYPES()
    slots = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            combo = isinstance(kind, list) or kind == "COMBO"
            if options.get("forceInput") or not (combo or kind in WIDGET_TYPES):
                continue
            control = options.get("control_after_generate")
            if kind == "INT":
                helpers = int(bool(control if control is not None else name in ("seed", "noise_seed")))
            elif combo:
                helpers = 2 * bool(control) + bool(options.get("image_upload"))
            else:
                helpers = 0
            slots.append((name, helpers))
    return slots


# --- fixtures: checkpoint and dataset ------------------------------------------------------------


def cache_dir() -> Path:
    """LORA_TRAINER_TEST_CACHE, default ~/.cache/lora_trainer_tests."""
    default = Path.home() / ".cache" / "lora_trainer_tests"
    return Path(os.environ.get("LORA_TRAINER_TEST_CACHE") or default)


def make_sd15_checkpoint(path: str | Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(single-file checkpoint, diffusers folder) holding the same random SD1.5-architecture weights.

    Recipe (notes §12): diffusers/transformers models with SD1.5's published configs and
    their default random init (seeded), saved fp16 as a diffusers folder with ComfyUI's own
    CLIP tokenizer files (both sides tokenise identically), loaded by
    `comfy.diffusers_load.load_diffusers` and written by ComfyUI as one fp16 .safetensors.
    Reused when `path` (default: under `cache_dir()`) already holds a finished build; ~2 GB.
    """
    _require_setup()
    folder = Path(path) if path else cache_dir() / f"sd15_random_{CHECKPOINT_RECIPE}_seed{seed}"
    checkpoint, twin = folder / f"sd15_random_seed{seed}.safetensors", folder / "diffusers"
    if (folder / "complete").is_file():
        return checkpoint, twin
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    _write_diffusers_twin(staging / "diffusers", seed)
    _write_comfy_checkpoint(staging / "diffusers", staging / checkpoint.name)
    (staging / "complete").write_text("ok\n", encoding="utf-8")
    try:
        staging.rename(folder)  # atomic: a concurrent build that finished first wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint, twin


def _write_diffusers_twin(folder: Path, seed: int) -> None:
    import safetensors.torch
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = {
            "unet": UNet2DConditionModel(cross_attention_dim=768),  # the other defaults are SD1.5's
            "vae": AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=512,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    projection_dim=768,
                    vocab_size=49408,
                )
            ),
        }
    for name, model in parts.items():
        model.half().save_pretrained(folder / name)
    del parts
    gc.collect()
    # transformers 5 drops the `text_model.` level from CLIPTextModel's keys; ComfyUI's
    # load_clip then leaves the encoder uninitialised. Real SD1.5 files have the prefix.
    te_file = folder / "text_encoder" / "model.safetensors"
    state = safetensors.torch.load_file(te_file)
    if not next(iter(state)).startswith("text_model."):
        state = {f"text_model.{k}": v for k, v in state.items()}
        safetensors.torch.save_file(state, te_file, metadata={"format": "pt"})
    _write_tokenizer(folder / "tokenizer")
    _write_pipeline_files(folder)


def _write_tokenizer(folder: Path) -> None:
    """ComfyUI's SD1 tokenizer files, with SD1.5's 77-token model_max_length (ComfyUI's says 8192)."""
    source = _STATE["comfyui_dir"] / "comfy" / "sd1_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copyfile(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = 77
    config.pop("special_tokens_map_file", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def _write_pipeline_files(folder: Path) -> None:
    """scheduler/ and model_index.json as in the SD1.5 repository, so the folder is a pipeline."""
    scheduler = {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")


def _write_comfy_checkpoint(diffusers_folder: Path, checkpoint: Path) -> None:
    import comfy.diffusers_load
    import comfy.model_management as mm
    import comfy.utils
    import torch

    model, clip, vae = comfy.diffusers_load.load_diffusers(str(diffusers_folder))
    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    state = checkpoint_state_dict(model, clip_state_dict=clip.get_sd(), vae_state_dict=vae.get_sd())
    # comfy.sd.save_checkpoint would write the loaded dtypes (fp32 on CPU): cast to halve the file.
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    comfy.utils.save_torch_file(state, str(checkpoint))
    del model, clip, vae, state
    mm.unload_all_models()
    gc.collect()


def checkpoint_state_dict(model, **parts) -> dict:
    """The checkpoint's state dict, as comfy.sd.save_checkpoint assembles it, by keyword.

    0.3.64: `BaseModel.state_dict_for_saving(clip_state_dict, vae_state_dict, ...)` takes the
    UNet's state dict itself. Newer releases (comfy/model_base.py in Comfy-Org/ComfyUI at
    26adb81a) take `unet_state_dict` first, which `ModelPatcher.state_dict_for_saving(
    clip_state_dict=..., ...)` builds (comfy/model_patcher.py at e59d85a0).
    """
    if "unet_state_dict" in inspect.signature(model.model.state_dict_for_saving).parameters:
        return model.state_dict_for_saving(**parts)
    return model.model.state_dict_for_saving(**parts)


def install_checkpoint(checkpoint: Path) -> str:
    """Link a checkpoint into models/checkpoints; returns the name CheckpointLoaderSimple takes."""
    target = models_dir("checkpoints") / checkpoint.name
    if not target.exists():
        target.symlink_to(checkpoint.resolve())
    return checkpoint.name


def make_tiny_dataset(count: int = 4) -> Path:
    """The core's synthetic shapes dataset in ComfyUI's input folder (`input/lora_test_dataset`)."""
    from lora_train_core.demo import make_synthetic_dataset

    return make_synthetic_dataset(input_dir() / DATASET_NAME, count=count)
