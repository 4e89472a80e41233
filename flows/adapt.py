"""AdaMerging on a user's own checkpoints as a Prefect flow: one task, cached by the content of its
inputs (the sha256 of θ0 and every fine-tune), the parameters, the evaluator (name and options)
and the code identity; the library call is :func:`mergeflow.adaptation.adapt_checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext

from mergeflow.adamerging import AdaMergingParams
from mergeflow.adaptation import adapt_checkpoints, load_evaluator
from mergeflow.codeid import code_identity
from mergeflow.hashing import sha256_file_cached
from tasks.caching import content_key


def _key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="adapt-checkpoints",
        inputs=[sha256_file_cached(p) for p in (parameters["pretrained"], *parameters["finetuned"])],
        params=parameters["params"], evaluator=parameters["evaluator"], options=parameters["options"],
        output=parameters["output"], code=code_identity(adapt_checkpoints.__module__),
    )  # fmt: skip


@task(name="adapt-checkpoints", cache_key_fn=_key, persist_result=True)
def adapt_task(
    pretrained: str, finetuned: list[str], evaluator: str, options: dict[str, Any], params: dict[str, Any],
    output: str, device: str,
) -> dict[str, Any]:  # fmt: skip
    """Learn the coefficients and write the adapted model (reused when the file's fingerprint matches)."""
    identity = json.dumps({"evaluator": evaluator, "options": options}, sort_keys=True, default=str)
    result = adapt_checkpoints(pretrained, finetuned, load_evaluator(evaluator, options), AdaMergingParams(**params),
                               output, evaluator_id=identity, device=device)  # fmt: skip
    return {**result, "output": str(result["output"])}


@flow(name="adapt-checkpoints")
def adapt_flow(
    pretrained: str,
    finetuned: list[str],
    evaluator: str,
    output: str,
    params: dict[str, Any] | None = None,
    evaluator_options: dict[str, Any] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """AdaMerging of ``finetuned`` over ``pretrained`` with the evaluator ``package.module:factory``."""
    checked = AdaMergingParams(**(params or {})).model_dump(mode="json")  # bad parameters fail before any work
    state = adapt_task(str(pretrained), [str(p) for p in finetuned], evaluator, dict(evaluator_options or {}),
                       checked, str(Path(output)), device, return_state=True)  # fmt: skip
    result = state.result()
    if not Path(result["output"]).is_file():  # cached, but the file is gone: compute again
        state = adapt_task.with_options(refresh_cache=True)(
            str(pretrained), [str(p) for p in finetuned], evaluator, dict(evaluator_options or {}), checked,
            str(Path(output)), device, return_state=True,
        )  # fmt: skip
        result = state.result()
    return {**result, "state": state.name}
