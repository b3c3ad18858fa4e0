"""Regenerate the vendored CRD schemas in this folder from the operators' released API packages.

No installable validator checks Kubeflow's custom resources offline, and the CRD files the
operators publish embed a full copy of every Kubernetes type they use (half a megabyte each).
The same API is published on PyPI as generated models, pinned here:

    pip install --no-deps --target /tmp/kf kubeflow-trainer-api==2.3.0 kubeflow-training==1.9.4
    PYTHONPATH=/tmp/kf .venv/bin/python tests/k8s_schemas/generate.py

- ``kubeflow-trainer-api`` 2.3.0: Kubeflow Trainer v2.3.0, ``trainer.kubeflow.org/v1alpha1``
  (TrainJob, TrainingRuntime, ClusterTrainingRuntime) and the ``jobset.x-k8s.io/v1alpha2``
  types its runtimes embed; pydantic models generated from the Trainer's OpenAPI spec.
- ``kubeflow-training`` 1.9.4: the training operator's ``kubeflow.org/v1`` (PyTorchJob);
  OpenAPI-generator models (read with ``ast``, never imported or run).

Each operator type becomes a JSON Schema (draft 2020-12) object with its fields, their types and
its required fields, and ``additionalProperties: false``: the API server (kubectl's default
``--validate=strict``) refuses unknown fields. Kubernetes' own types (ObjectMeta,
PodTemplateSpec, JobTemplateSpec, EnvVar, ...) become ``$ref``s into kubernetes-validate's strict
definitions, so they are checked exactly as the core kinds are. What the generated models do not
carry (value ranges, enums, CEL rules) is not checked here.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import importlib.util
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# kubernetes-validate's definitions file, registered under this short name by the test's validator.
K8S_DEFS = "k8s:#/$defs/"
Schema = dict[str, Any]



@dataclass(frozen=True)
class Api:
    package: str  # the PyPI release the schema comes from
    api_version: str
    kinds: dict[str, str]  # kind -> the package's class for it
    out: str  # file written beside this script


TRAINER = Api(
    package="kubeflow-trainer-api==2.3.0",
    api_version="trainer.kubeflow.org/v1alpha1",
    kinds={
        "TrainJob": "TrainerV1alpha1TrainJob",
        "TrainingRuntime": "TrainerV1alpha1TrainingRuntime",
        "ClusterTrainingRuntime": "TrainerV1alpha1ClusterTrainingRuntime",
    },
    out="trainer.kubeflow.org_v1alpha1.yaml",
)
PYTORCHJOB = Api(
    package="kubeflow-training==1.9.4",
    api_version="kubeflow.org/v1",
    kinds={"PyTorchJob": "KubeflowOrgV1PyTorchJob"},
    out="kubeflow.org_v1_pytorchjob.yaml",
)
# Kubernetes python client names used by the kubeflow-training models: V1X is core/v1 X or
# meta/v1 X, whichever Kubernetes defines (no name is in both); these two are spelt otherwise.
V1_K8S_GROUPS = ("io.k8s.api.core.v1.", "io.k8s.apimachinery.pkg.apis.meta.v1.")
V1_K8S_NAMES = {
    "Quantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "K8sIoApiAutoscalingV2MetricSpec": "io.k8s.api.autoscaling.v2.MetricSpec",
}


def camel(definition: str) -> str:
    """``io.k8s.api.core.v1.EnvVar`` -> ``IoK8sApiCoreV1EnvVar`` (the generator's class name)."""
    return "".join(part[:1].upper() + part[1:] for part in definition.split("."))


def k8s_class_names() -> dict[str, str]:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    latest = sorted(root.glob("v*-local-strict"), key=lambda p: [int(x) for x in
                    re.findall(r"\d+", p.name)])[-1]
    defs = json.loads((latest / "_definitions.json").read_text())["$defs"]
    return {camel(name): name for name in defs}


def root_schema(api_version: str, kinds: dict[str, str], defs: dict[str, Schema],
                header: str) -> Schema:
    for kind, cls in kinds.items():
        body = defs[cls]
        body["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
        body["properties"]["kind"] = {"type": "string", "enum": [kind]}
        body["required"] = sorted({*body.get("required", []), "apiVersion", "kind", "metadata"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:elcrec:k8s-schemas:{api_version}",
        "$comment": header,
        "apiVersion": api_version,
        "kinds": {kind: f"#/$defs/{cls}" for kind, cls in kinds.items()},
        "$defs": dict(sorted(defs.items())),
    }


# --- kubeflow-trainer-api (pydantic models) -------------------------------------------------------

def pydantic_defs(root_classes: list[str], k8s: dict[str, str]) -> dict[str, Schema]:
    models = importlib.import_module("kubeflow_trainer_api.models")
    defs: dict[str, Schema] = {}
    pending = list(root_classes)

    def of(annotation: Any) -> Schema:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            return of(args[0])
        if origin in (typing.Union, types.UnionType):
            options = [of(a) for a in args if a is not type(None)]
            return options[0] if len(options) == 1 else {"anyOf": options}
        if origin is list:
            return {"type": "array", "items": of(args[0])}
        if origin is dict:
            value = args[1]
            if value is Any:
                return {"type": "object"}  # x-kubernetes-preserve-unknown-fields
            return {"type": "object", "additionalProperties": of(value)}
        if annotation is Any:
            return {}
        simple = {str: "string", int: "integer", bool: "boolean", float: "number",
                  datetime.datetime: "string"}
        if annotation in simple:
            return {"type": simple[annotation]}
        name = annotation.__name__
        if name in k8s:
            return {"$ref": K8S_DEFS + k8s[name]}
        if name not in defs and name not in pending:
            pending.append(name)
        return {"$ref": f"#/$defs/{name}"}

    while pending:
        name = pending.pop()
        cls = getattr(models, name)
        props: Schema = {}
        required = []
        for field_name, info in cls.model_fields.items():
            key = info.alias or field_name
            props[key] = of(info.annotation)
            if info.is_required():
                required.append(key)
        body: Schema = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            body["required"] = sorted(required)
        defs[name] = body
    return defs


# --- kubeflow-training (OpenAPI-generator models, read as text) -----------------------------------

def class_tables(path: Path) -> tuple[str, dict[str, str], dict[str, str], set[str]]:
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    tables: dict[str, dict[str, str]] = {}
    for node in cls.body:
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
            tables[target.id] = ast.literal_eval(node.value)
    required = set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", path.read_text()))
    return cls.name, tables["openapi_types"], tables["attribute_map"], required


def openapi_generator_defs(root_classes: list[str], k8s: dict[str, str]) -> dict[str, Schema]:
    spec = importlib.util.find_spec("kubeflow.training")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("kubeflow-training is not on PYTHONPATH (see the docstring)")
    models_dir = Path(next(iter(spec.submodule_search_locations))) / "models"
    by_class = {}
    for path in models_dir.glob("kubeflow_org_v1_*.py"):
        name, types_, names, required = class_tables(path)
        by_class[name] = (types_, names, required)
    defs: dict[str, Schema] = {}
    pending = list(root_classes)

    def of(text: str) -> Schema:
        if text.startswith("list[") and text.endswith("]"):
            return {"type": "array", "items": of(text[5:-1])}
        if text.startswith("dict(str, ") and text.endswith(")"):
            return {"type": "object", "additionalProperties": of(text[10:-1])}
        simple = {"str": "string", "int": "integer", "bool": "boolean", "float": "number",
                  "datetime": "string"}
        if text in simple:
            return {"type": simple[text]}
        if text == "object":
            return {}
        if text in V1_K8S_NAMES:
            return {"$ref": K8S_DEFS + V1_K8S_NAMES[text]}
        if text.startswith("V1"):
            found = [g + text[2:] for g in V1_K8S_GROUPS if g + text[2:] in k8s.values()]
            if len(found) != 1:
                raise SystemExit(f"{text}: {len(found)} Kubernetes definitions match")
            return {"$ref": K8S_DEFS + found[0]}
        if text not in by_class:
            raise SystemExit(f"unknown type {text!r} in the kubeflow-training models")
        if text not in defs and text not in pending:
            pending.append(text)
        return {"$ref": f"#/$defs/{text}"}

    while pending:
        name = pending.pop()
        types_, names, required = by_class[name]
        props = {names[attr]: of(kind) for attr, kind in types_.items()}
        body: Schema = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            body["required"] = sorted(names[attr] for attr in required)
        defs[name] = body
    return defs


def write(api: Api, defs: dict[str, Schema]) -> None:
    header = f"{api.api_version} as published in {api.package} (PyPI)"
    schema = root_schema(api.api_version, api.kinds, defs, header)
    text = (f"# {api.api_version}: {', '.join(api.kinds)}.\n"
            f"# Origin: {api.package} (PyPI), the operator's released API models.\n"
            "# Generated by tests/k8s_schemas/generate.py (see its docstring); do not edit.\n"
            "# k8s:#/$defs/NAME is Kubernetes' NAME in kubernetes-validate's strict schemas.\n")
    text += yaml.safe_dump(schema, sort_keys=False, width=100)
    (HERE / api.out).write_text(text)
    print(f"wrote {api.out}: {len(defs)} types", flush=True)


def main() -> int:
    if importlib.util.find_spec("kubeflow_trainer_api") is None:
        print(__doc__, file=sys.stderr)
        return 2
    k8s = k8s_class_names()
    write(TRAINER, pydantic_defs(list(TRAINER.kinds.values()), k8s))
    write(PYTORCHJOB, openapi_generator_defs(list(PYTORCHJOB.kinds.values()), k8s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
