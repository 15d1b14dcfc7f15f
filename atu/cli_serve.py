"""`atu serve`: vLLM on an export with the leakage guard in front of it (an OpenAI-compatible endpoint)."""

from __future__ import annotations

from pathlib import Path

import click

from atu.cli_errors import friendly


@click.command("serve")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click.option(
    "--vllm-device",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="Defaults of the vLLM started here: cuda = vLLM's own (dtype auto, CUDA graphs unless the capture backend "
    "needs eager mode, its memory share); cpu = fp32, a 0.3 memory share, eager, in-process engine; auto = cuda "
    "when torch sees a GPU.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Where the guard listens.")
@click.option("--port", default=8000, show_default=True, help="The guard's port (clients talk to this one).")
@click.option("--upstream", default=None, help="URL of a vLLM server already serving the export (else one starts).")
@click.option(
    "--vllm-port", type=int, default=None, help="Port for the vLLM server started here (default: a free one)."
)
@click.option("--model-name", default=None, help="Model name clients send (default: the export directory's name).")
@click.option("--policy", type=click.Choice(["monitor", "block"]), default="monitor", show_default=True)
@click.option(
    "--on-scoring-error",
    type=click.Choice(["open", "closed"]),
    default="open",
    show_default=True,
    help="monitor only: pass (open) or refuse with 503 (closed) a completion that could not be scored.",
)
@click.option(
    "--flag-scope",
    type=click.Choice(["completion", "named", "exchange"]),
    default="completion",
    show_default=True,
    help="What the policy acts on: concepts flagged in the completion; or also those whose name the prompt writes "
    "(named); or also those the prompt's score flags (exchange). The wider scopes are the second line behind a model "
    "that may still leak: an answer to a question about a forgotten person is flagged.",
)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: $ATU_API_KEY, or none).")
@click.option(
    "--disclose",
    type=click.Choice(["action", "scores", "full"]),
    default="action",
    show_default=True,
    help="What responses reveal: the action and whether anything was flagged (action), also each choice's highest "
    "score (scores), also concept names, thresholds and excerpts (full: names the forgotten concepts to any client).",
)
@click.option(
    "--operator-key",
    default=None,
    help="Key of /v1/leakage and /metrics (default: $ATU_OPERATOR_KEY; unset: those answer 403). Not the API key.",
)
@click.option("--metric-concept-names", is_flag=True, help="Label /metrics by concept name (default: ids c0, c1...).")
@click.option("--max-concurrency", default=256, show_default=True, help="Requests in flight; past it: 429.")
@click.option("--max-n", default=8, show_default=True, help="Largest 'n' (choices per prompt) accepted.")
@click.option("--max-tokens", default=4096, show_default=True, help="Largest 'max_tokens' accepted.")
@click.option("--max-prompts", default=32, show_default=True, help="Most prompts in one completions request.")
@click.option("--scoring-timeout", default=30.0, show_default=True, help="Seconds one scoring may take.")
@click.option(
    "--match-names/--no-match-names",
    default=True,
    show_default=True,
    help="Flag a forgotten concept whose name is written in the prompt or completion, whatever its score.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "capture", "hf", "vllm"]),
    default="auto",
    show_default=True,
    help="Hidden states for scoring: capture (recorded inside the generating vLLM by the atu plugin), hf "
    "(transformers re-runs the first layers), vllm (a pooling runner on a truncated probe model); auto: capture "
    "when vLLM is started here or --capture-socket is given, else hf.",
)
@click.option(
    "--capture-socket",
    default=None,
    help="With --upstream: the capture plugin's socket in that vLLM (its ATU_CAPTURE_SOCKET).",
)
@click.option("--device", default="cpu", show_default=True, help="torch device of the hf backend.")
@click.option(
    "--audit",
    "audit_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("atu-audit.sqlite"),
    show_default=True,
    help="SQLite audit log (appended to).",
)
@click.option("--no-audit", is_flag=True, help="Keep no audit log.")
@click.option("--store-text", is_flag=True, help="Keep raw prompts and completions in the audit log (else hashes).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for vLLM before answering 504.")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, help="Larger request bodies get 413.")
@click.option(
    "--stream-score-every",
    default=8,
    show_default=True,
    help="block: score a stream first after N chunks (nothing unscored is sent), then in groups twice the last.",
)
@click.option(
    "--stream-score-max-every",
    default=64,
    show_default=True,
    help="block: the largest group of chunks held before a scoring.",
)
@friendly
def serve_cmd(
    export_dir,
    vllm_args,
    vllm_device,
    host,
    port,
    upstream,
    vllm_port,
    model_name,
    policy,
    on_scoring_error,
    flag_scope,
    api_key,
    disclose,
    operator_key,
    metric_concept_names,
    max_concurrency,
    max_n,
    max_tokens,
    max_prompts,
    scoring_timeout,
    match_names,
    backend,
    capture_socket,
    device,
    audit_path,
    no_audit,
    store_text,
    timeout,
    max_body_bytes,
    stream_score_every,
    stream_score_max_every,
) -> None:
    """Serve EXPORT_DIR with vLLM behind the leakage guard (OpenAI-compatible); Ctrl-C stops both.

    Everything after `--` goes to the vLLM started here unchanged, after atu's own arguments, so it may override
    them: `atu serve EXPORT -- --tensor-parallel-size 2 --max-model-len 8192 --quantization fp8`."""
    from atu import envs
    from serve.launch import ServeOptions, check_port_free, make_guard, run_forever, upstream_servers
    from serve.settings import GuardSettings

    # A tampered or incomplete export is refused by upstream_servers before vLLM reads it, and by the scorer.
    check_port_free(host, port)
    opts = ServeOptions(
        export_dir=export_dir,
        upstream_url=upstream,
        vllm_port=vllm_port,
        model_name=model_name,
        backend=backend,
        device=device,
        capture_socket=capture_socket,
        vllm_args=tuple(vllm_args),
        vllm_device=vllm_device,
    )
    if upstream is None:
        click.echo(f"starting vLLM on {export_dir / 'model'} (about a minute on CPU)...")
    with upstream_servers(opts) as up:
        settings = GuardSettings(
            upstream_url=up.url,
            upstream_key=up.key,
            host=host,
            port=port,
            policy=policy,
            flag_scope=flag_scope,
            on_scoring_error=on_scoring_error,
            api_key=api_key or envs.api_key(),
            disclose=disclose,
            operator_key=operator_key or envs.operator_key(),
            metric_concept_names=metric_concept_names,
            max_concurrency=max_concurrency,
            max_n=max_n,
            max_tokens=max_tokens,
            max_prompts=max_prompts,
            scoring_timeout=scoring_timeout,
            match_names=match_names,
            max_body_bytes=max_body_bytes,
            upstream_timeout=timeout,
            stream_score_every=stream_score_every,
            stream_score_max_every=stream_score_max_every,
            audit_path=None if no_audit else str(audit_path),
            audit_store_text=store_text,
        )
        guard = make_guard(
            export_dir,
            settings,
            backend=up.backend,
            device=device,
            pooling_url=up.pooling_url,
            capture_socket=up.capture_socket,
        )
        click.echo(f"vLLM:  {up.url}  (model {up.model_name!r})")
        if up.pooling_url:
            click.echo(f"probe: {up.pooling_url}  (vLLM pooling runner, hidden states at the hook layer)")
        if up.capture_socket:
            click.echo(f"capture: {up.capture_socket}  (hook-layer states recorded inside vLLM as it generates)")
        click.echo(
            f"guard: http://{host}:{port}/v1  policy={policy}  backend={up.backend}  "
            f"api key={'on' if settings.api_key else 'off'}  disclose={disclose}  "
            f"operator key={'on' if settings.operator_key else 'off'}  audit={settings.audit_path or 'off'}"
        )
        click.echo("endpoints: /v1/completions /v1/chat/completions /v1/models /v1/leakage /live /ready /metrics")
        click.echo("Ctrl-C stops the guard and vLLM.", err=False)
        run_forever(guard)
    click.echo("stopped.")
