"""`tpi generate` and `tpi chat`: the master's user-facing commands."""

from __future__ import annotations

import sys
import threading

import click

MODEL_HELP = (
    "Model: a Hugging Face checkpoint directory, a .gguf file (converted once), or the name "
    "of a cached model (see 'tpi models'). Default: the embedded SmolLM2-135M-Instruct."
)


def model_options(max_new_default: int):
    def decorate(f):
        options = [
            click.option("--model", "-m", default=None, metavar="PATH|NAME", help=MODEL_HELP),
            click.option(
                "--dtype",
                type=click.Choice(["fp32", "bf16"]),
                default="fp32",
                show_default=True,
                help="Compute dtype (bf16 halves memory, at some accuracy cost).",
            ),
            click.option(
                "--temperature",
                "-t",
                type=float,
                default=None,
                help="Sampling temperature; 0 = greedy. Default: the model's generation_config, else greedy.",
            ),
            click.option(
                "--top-k",
                type=int,
                default=None,
                help="Sample only among the k most likely tokens (0 = off).",
            ),
            click.option(
                "--top-p",
                type=float,
                default=None,
                help="Nucleus sampling: smallest set with this probability mass (1 = off).",
            ),
            click.option(
                "--seed", type=int, default=None, help="Random seed, for reproducible sampling."
            ),
            click.option(
                "--max-new-tokens",
                "-n",
                type=click.IntRange(min=1),
                default=max_new_default,
                show_default=True,
                help="Stop after this many generated tokens.",
            ),
        ]
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


@click.command()
@click.argument("prompt")
@model_options(max_new_default=256)
@click.option(
    "--raw",
    is_flag=True,
    help="Send PROMPT as-is instead of wrapping it in the model's chat template.",
)
@click.option("--system", default=None, help="System prompt (chat template only).")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr at the end.")
def generate(
    prompt, model, dtype, temperature, top_k, top_p, seed, max_new_tokens, raw, system, stats
):
    """Generate a reply to PROMPT and stream it to stdout ('-' reads PROMPT from stdin).

    Instruction models get PROMPT wrapped in their chat template; use --raw for
    plain text completion.
    """
    from master.generation import GenerationStats, generate_tokens
    from master.loader import open_model, sampling_params
    from tpi.errors import PromptError
    from tpi.tokenizer import StreamDecoder

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise PromptError("the prompt is empty")
    loaded = open_model(model, dtype)
    params = sampling_params(loaded.model_dir, temperature, top_k, top_p, seed, max_new_tokens)
    tok = loaded.tokenizer
    if raw or tok.chat_template is None:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tok.encode_chat(messages)
    st = GenerationStats()
    decoder = StreamDecoder(tok)
    for token in generate_tokens(loaded.engine, ids, params, tok.eos_ids, st, threading.Event()):
        click.echo(decoder.push(token), nl=False)
    click.echo(decoder.flush())
    if stats:
        click.echo(
            f"prompt {st.prompt_tokens} tokens in {st.prefill_seconds:.2f} s; "
            f"{st.new_tokens} new tokens, {st.decode_tokens_per_second:.1f} tok/s ({st.stop_reason})",
            err=True,
        )


@click.command()
@model_options(max_new_default=512)
@click.option("--system", default=None, help="System prompt for the whole conversation.")
def chat(model, dtype, temperature, top_k, top_p, seed, max_new_tokens, system):
    """Chat with the model in the terminal (history kept across turns).

    Type a message and press Enter. /reset forgets the conversation, /exit or
    Ctrl-D quits, Ctrl-C stops the current answer. Tokens/s are shown after each
    answer; the KV cache of earlier turns is reused, so only new text is processed.
    """
    from master.chat_repl import run_repl
    from master.chat_session import ChatSession
    from master.loader import open_model, sampling_params

    loaded = open_model(model, dtype)
    params = sampling_params(loaded.model_dir, temperature, top_k, top_p, seed, max_new_tokens)
    click.echo(f"model: {loaded.model_dir} (loaded in {loaded.load_seconds:.1f} s)", err=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    session = ChatSession(loaded.engine, loaded.tokenizer, params, system_prompt=system)
    run_repl(session)
