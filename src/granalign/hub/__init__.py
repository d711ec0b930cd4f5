"""Publishing GranAlign models on the Hugging Face Hub: an atomic push of a saved model directory with a
generated model card and the Inference Endpoints custom handler (`templates/handler.py`), a training-loop
hook, and the `granalign push` command-line pieces; and loading the model a command names, a saved
directory or a Hub repo id (`load_model_and_processor`)."""

from .callback import HubPushCallback
from .eval_results import EvalSource, RetrievalResult, load_eval_results, parse_eval_spec
from .loading import load_model_and_processor, model_file
from .model_card import (
    TEMPLATE_PATH,
    build_model_card,
    endpoint_snippet,
    extract_endpoint_snippet,
    extract_usage_snippet,
    usage_snippet,
    validate_model_card,
)
from .push import (
    PushError,
    PushResult,
    card_for_push,
    check_repo_id,
    collect_model_files,
    push_model_dir,
    resolve_token,
)

__all__ = [
    "TEMPLATE_PATH",
    "EvalSource",
    "HubPushCallback",
    "PushError",
    "PushResult",
    "RetrievalResult",
    "build_model_card",
    "card_for_push",
    "check_repo_id",
    "collect_model_files",
    "endpoint_snippet",
    "extract_endpoint_snippet",
    "extract_usage_snippet",
    "load_eval_results",
    "load_model_and_processor",
    "model_file",
    "parse_eval_spec",
    "push_model_dir",
    "resolve_token",
    "usage_snippet",
    "validate_model_card",
]
