"""The real ``sglang.Engine`` interface, read from the pinned sglang wheel without importing it.

sglang cannot be installed beside the CPU torch, so the GPU path's contract is derived from the
wheel itself: ``wheel_path()`` downloads the version pinned in pyproject.toml's ``gpu`` extra (once,
into ``$AAPO_RAY_CACHE/wheels`` or ``~/.cache/aapo_ray/wheels``) and ``read_interface()`` parses its
sources with ``ast`` (files read through ``zipfile``): the ServerArgs fields the Engine constructor
accepts, the Engine method signatures, the SamplingParams keys, the finish-reason JSON shapes, the
weight-update refusal messages and the wheel's pinned dependencies. ``interface_json()`` caches the
result next to the wheel; ``tests/fake_sglang`` builds a fake Engine from it.

No fallback: without an exact ``sglang==X`` pin, or when pip cannot fetch the wheel, this raises.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 2  # bump when read_interface's output changes: cached JSON of another schema is rebuilt

# The Engine methods the fake implements and the contract test checks.
ENGINE_METHODS = (
    "__init__", "generate", "async_generate", "update_weights_from_tensor", "begin_weight_update",
    "end_weight_update", "init_weights_update_group", "destroy_weights_update_group",
    "update_weights_from_distributed", "flush_cache", "release_memory_occupation",
    "resume_memory_occupation", "shutdown",
)
# Files inside the 0.5.2x wheel layout; a pin that moves them makes read_interface fail loudly.
ENGINE_PY = "sglang/srt/entrypoints/engine.py"
SERVER_ARGS_PY = "sglang/srt/server_args.py"
FIELD_ORDER_PY = "sglang/srt/arg_groups/field_order.py"
SAMPLING_PY = "sglang/srt/sampling/sampling_params.py"
SCHEDULE_BATCH_PY = "sglang/srt/managers/schedule_batch.py"
WEIGHT_UPDATER_PY = "sglang/srt/managers/scheduler_components/weight_updater.py"
TOKENIZER_MANAGER_PY = "sglang/srt/managers/tokenizer_manager.py"
# The wheel's own platform, so the download does not depend on the interpreter running the tests.
WHEEL_PLATFORM = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                  "--platform", "manylinux_2_34_x86_64")


def pinned_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The exact ``sglang==X`` pin of pyproject's ``gpu`` extra; raises if there is none."""
    import tomllib

    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    pins = [m.group(1) for req in extras.get("gpu", [])
            if (m := re.fullmatch(r"\s*sglang\s*==\s*([0-9][\w.]*)\s*", req.split(";")[0]))]
    if len(pins) != 1:
        raise RuntimeError(f"{pyproject}: the gpu extra must pin sglang exactly (sglang==X); "
                           f"found {extras.get('gpu')!r}")
    return pins[0]


PINNED = pinned_version()


def cache_dir() -> Path:
    base = os.environ.get("AAPO_RAY_CACHE") or str(Path.home() / ".cache" / "aapo_ray")
    return Path(base) / "wheels"


def wheel_path(version: str = PINNED) -> Path:
    """The pinned sglang wheel, downloaded on first use; RuntimeError naming the command if pip fails."""
    dest = cache_dir()
    found = sorted(dest.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           *WHEEL_PLATFORM, "--dest", str(dest), f"sglang=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"sglang-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download the pinned sglang wheel: {' '.join(cmd)} exited "
                           f"{proc.returncode}\n{proc.stderr.strip()[-4000:]}")
    return found[0]


# ---------------------------------------------------------------------------------------- ast

_KINDS = {"posonlyargs": "POSITIONAL_ONLY", "args": "POSITIONAL_OR_KEYWORD",
          "kwonlyargs": "KEYWORD_ONLY"}


def _default(node: ast.AST | None) -> dict:
    """``{"required": True}``, ``{"default": <literal>}`` or ``{"default_expr": <source>}``."""
    if node is None:
        return {"required": True}
    try:
        value = ast.literal_eval(node)
        json.dumps(value)
        return {"default": value}
    except (ValueError, TypeError, SyntaxError):
        return {"default_expr": ast.unparse(node)}


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict:
    a = fn.args
    params = []
    positional = a.posonlyargs + a.args
    pos_defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, arg in enumerate(positional):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        params.append({"name": arg.arg, "kind": kind, **_default(pos_defaults[i])})
    if a.vararg:
        params.append({"name": a.vararg.arg, "kind": "VAR_POSITIONAL", "required": False})
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append({"name": arg.arg, "kind": "KEYWORD_ONLY", **_default(d)})
    if a.kwarg:
        params.append({"name": a.kwarg.arg, "kind": "VAR_KEYWORD", "required": False})
    if params and params[0]["name"] in ("self", "cls"):
        params = params[1:]
    return {"params": params, "async": isinstance(fn, ast.AsyncFunctionDef), "line": fn.lineno}


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def _methods(cls: ast.ClassDef) -> dict:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _struct_fields(cls: ast.ClassDef) -> list[dict]:
    """Annotated class attributes (dataclass / msgspec.Struct fields), ClassVar excluded."""
    fields = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" in ast.unparse(node.annotation):
                continue
            fields.append({"name": node.target.id, **_default(node.value), "line": node.lineno})
    return fields


class _Wheel:
    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path)
        self.trees: dict[str, ast.Module] = {}

    def text(self, name: str) -> str:
        return self.zip.read(name).decode()

    def tree(self, name: str) -> ast.Module:
        if name not in self.trees:
            self.trees[name] = ast.parse(self.text(name), filename=name)
        return self.trees[name]


def _server_args_fields(w: _Wheel) -> list[dict]:
    """ServerArgs' constructor fields. In 0.5.2x ServerArgs is a msgspec.defstruct assembled from
    the namespace Structs listed in ``_INPUT_NAMESPACES`` (server_args.py), ordered by
    ``POSITIONAL_FIELD_ORDER`` (arg_groups/field_order.py) then declaration order."""
    tree = w.tree(SERVER_ARGS_PY)
    imports = {alias.asname or alias.name: node.module for node in tree.body
               if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
    own = _struct_fields(_class(tree, "ServerArgs"))
    names = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "_INPUT_NAMESPACES"):
            names = [elt.id for elt in node.value.elts]
    fields: dict[str, dict] = {}
    for ns in names:
        module = imports[ns].replace(".", "/") + ".py"
        for f in _struct_fields(_class(w.tree(module), ns)):
            if f["name"] in fields:
                raise ValueError(f"ServerArgs field {f['name']} declared twice")
            fields[f["name"]] = {**f, "namespace": ns, "file": module}
    for f in own:
        fields.setdefault(f["name"], {**f, "namespace": "ServerArgs", "file": SERVER_ARGS_PY})
    if not fields:
        raise LookupError("no ServerArgs fields found")
    order: list[str] = []
    if names:
        for node in w.tree(FIELD_ORDER_PY).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "POSITIONAL_FIELD_ORDER":
                order = [n for n in ast.literal_eval(node.value) if n in fields]
    order += [n for n in fields if n not in order]
    return [fields[n] for n in order]


def _finish_reasons(w: _Wheel) -> dict:
    """``{class: {"type": <to_json type>, "keys": [...]}}`` for BaseFinishReason subclasses."""
    out = {}
    for cls in w.tree(SCHEDULE_BATCH_PY).body:
        if not (isinstance(cls, ast.ClassDef)
                and any(getattr(b, "id", "") == "BaseFinishReason" for b in cls.bases)):
            continue
        to_json = _methods(cls).get("to_json")
        for node in ast.walk(to_json) if to_json else ():
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                d = {ast.literal_eval(k): v for k, v in zip(node.value.keys, node.value.values)}
                out[cls.name] = {"type": ast.literal_eval(d["type"]), "keys": sorted(d),
                                 "line": cls.lineno}
    return out


def _refusals(w: _Wheel) -> dict:
    """The ``message=`` of the first early return of the scheduler's weight-update handlers
    (the refusal outside / on a nested begin_weight_update ... end_weight_update session)."""
    cls = next(n for n in w.tree(WEIGHT_UPDATER_PY).body if isinstance(n, ast.ClassDef)
               and "begin_weight_update" in _methods(n))
    out = {}
    for name in ("update_weights_from_tensor", "update_weights_from_distributed",
                 "begin_weight_update", "end_weight_update"):
        for node in ast.walk(_methods(cls)[name]):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
                kw = {k.arg: k.value for k in node.value.keywords}
                if isinstance(kw.get("message"), ast.Constant) and kw.get("success") is not None \
                        and ast.literal_eval(kw["success"]) is False:
                    out[name] = {"message": kw["message"].value, "line": node.lineno}
                    break
    return out


def _event_loop(w: _Wheel, engine: ast.ClassDef) -> dict:
    """Which asyncio calls Engine._ensure_event_loop makes, in order (the loop it captures)."""
    fn = _methods(engine)["_ensure_event_loop"]
    calls = [ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)]
    init_src = ast.unparse(_methods(engine)["__init__"])
    return {"ensure_event_loop_calls": calls, "line": fn.lineno,
            "captured_in_init": "self.loop = self._ensure_event_loop()" in init_src}


def _tokenizer_manager(w: _Wheel, engine: ast.ClassDef) -> dict:
    """What aborting one ``async_generate`` request needs: ``Engine.tokenizer_manager`` set in ``__init__`` and
    ``TokenizerManager.abort_request``'s signature (the Engine itself has no abort method)."""
    init_src = ast.unparse(_methods(engine)["__init__"])
    manager = _class(w.tree(TOKENIZER_MANAGER_PY), "TokenizerManager")
    return {"assigned_in_init": "self.tokenizer_manager = tokenizer_manager" in init_src,
            "abort_request": {**_signature(_methods(manager)["abort_request"]), "file": TOKENIZER_MANAGER_PY}}


def read_interface(wheel: Path) -> dict:
    """The JSON-serialisable interface of the sglang wheel at ``wheel`` (no import of sglang)."""
    w = _Wheel(Path(wheel))
    engine = _class(w.tree(ENGINE_PY), "Engine")
    methods = _methods(engine)
    missing = [m for m in ENGINE_METHODS if m not in methods]
    if missing:
        raise LookupError(f"Engine in {wheel} lacks {missing}")
    sp = _class(w.tree(SAMPLING_PY), "SamplingParams")
    sp_init = _methods(sp).get("__init__")
    sampling = ([p["name"] for p in _signature(sp_init)["params"]] if sp_init
                else [f["name"] for f in _struct_fields(sp)])
    meta = next(n for n in w.zip.namelist() if n.endswith(".dist-info/METADATA"))
    meta_text = w.text(meta)
    return {
        "schema": SCHEMA,
        "wheel": Path(wheel).name,
        "version": re.search(r"^Version: (.+)$", meta_text, re.M).group(1).strip(),
        "requires_python": (re.search(r"^Requires-Python: (.+)$", meta_text, re.M) or [None, None])[1],
        "requires_dist": re.findall(r"^Requires-Dist: (.+)$", meta_text, re.M),
        "engine": {name: {**_signature(methods[name]), "file": ENGINE_PY} for name in ENGINE_METHODS},
        "server_args": _server_args_fields(w),
        "sampling_params": sampling,
        "sampling_params_kind": "__init__" if sp_init else "struct_fields",
        "finish_reasons": _finish_reasons(w),
        "weight_update_refusals": _refusals(w),
        "event_loop": _event_loop(w, engine),
        "tokenizer_manager": _tokenizer_manager(w, engine),
    }


def interface_json(version: str = PINNED) -> Path:
    """Path of the cached interface JSON of the pinned wheel (built on first use)."""
    wheel = wheel_path(version)
    path = wheel.with_name(wheel.name + f".interface-v{SCHEMA}.json")
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(read_interface(wheel), indent=1, sort_keys=True))
        tmp.replace(path)
    return path


def load_interface(version: str = PINNED) -> dict:
    return json.loads(interface_json(version).read_text())


if __name__ == "__main__":
    print(interface_json())
