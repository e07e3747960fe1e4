"""`loramem serve`: the OpenAI-compatible server over memories."""

from __future__ import annotations

from typing import Optional

import typer

from loramem.cli import app
from loramem.cli.options import ModelOpt


@app.command()
def serve(
    memories: list[str] = typer.Option(..., "--memory", help="NAME=PATH, repeatable; a missing PATH is created by "
                                       "its first documents job"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="LORAMEM_API_KEY", help="require Authorization: Bearer KEY"),
    model: Optional[str] = ModelOpt,
    max_body: int = typer.Option(1_000_000, help="largest request body in bytes (413 above)"),
    max_batch: int = typer.Option(16, help="questions answered in one batch (1: no batching)"),
    batch_window_ms: float = typer.Option(5.0, help="how long to wait for more questions to batch"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
):
    """Serve memories over an OpenAI-compatible API (/v1/models, /v1/chat/completions, documents jobs)."""
    from loramem.serve import serve as run_server

    run_server(memories, host, port, api_key, model, max_body, batch_window_ms / 1000, max_batch, log_level)
