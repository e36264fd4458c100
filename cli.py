"""The ``minitx`` command line (installed as ``minitx.cli``).

Every user error is one line on stderr and a non-zero exit (2); ``verify``-style checks that ran
but found a failure exit 1. Tracebacks are reserved for bugs in minitx itself.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import click
import numpy as np

from minitx import __version__
from minitx.errors import MinitxError
from minitx.generate import check_ids


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MinitxError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minitx")
def main() -> None:
    """minitx: a Transformer engine whose every op is an executable NumPy spec."""


# ------------------------------------------------------------------------------ shared options
def backend_options(f):
    f = click.option("--explain", is_flag=True, help="Print which backend ran each node (to stderr).")(f)
    f = click.option("--no-fallback", is_flag=True,
                     help="Make it an error when a node's op is not implemented by the chosen backend(s).")(f)
    f = click.option("--backend", "backends", multiple=True, metavar="NAME",
                     help="Backend to run on, in order of preference (repeatable; default: numpy, the spec).")(f)
    return f


def _backends(backends: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for b in backends:
        out.extend(x.strip() for x in b.split(",") if x.strip())
    return tuple(out) or ("numpy",)


def load_model(path: str | None):
    from minitx import modelfile
    from minitx.bundled import default_model_path

    return modelfile.load(path if path is not None else default_model_path())


def print_explain(ex) -> None:
    from collections import Counter

    rows = ex.explain()
    width = max(len(n) for n, _, _ in rows)
    for name, op, backend in rows:
        click.echo(f"  {name:<{width}}  {op:<20} {backend}", err=True)
    counts = Counter(b for _, _, b in rows)
    click.echo("  ran on: " + ", ".join(f"{b} {c} node(s)" for b, c in counts.items()), err=True)


def _parse_ids(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise MinitxError(f"--ids expects comma-separated integers, got {spec!r}") from None


# ------------------------------------------------------------------------------------- init
@main.command()
@click.option("--arch", type=click.Choice(["gpt2", "bert", "llama"]), required=True)
@click.option("--preset", default="tiny", show_default=True, help="tiny or small.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.npz).")
def init(arch: str, preset: str, seed: int, output: str) -> None:
    """Write a randomly initialised model, for trying things out."""
    from minitx import modelfile, models
    from minitx.model import Model

    model = Model.from_config(models.preset(arch, preset), seed=seed)
    model.meta = {"source": f"minitx init --arch {arch} --preset {preset} --seed {seed}"}
    modelfile.save(model, output)
    click.echo(f"wrote {output}: {arch} ({preset}), {model.n_params():,} parameters, "
               f"{model.nbytes() / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------- infer
@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text for a decoder (repeatable: a batch).")
@click.option("--text", "texts", multiple=True, help="Text to embed with an encoder (repeatable).")
@click.option("--ids", "ids", multiple=True, help="Token ids, comma-separated, instead of text (repeatable).")
@click.option("--max-new-tokens", "-n", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, help="Stop token: an id, or a string the tokenizer maps to one token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@backend_options
def infer(model: str | None, prompts, texts, ids, max_new_tokens, temperature, top_k, top_p, seed, stops,
          as_json, backends, no_fallback, explain) -> None:
    """Generate text with a decoder, or embed text with an encoder.

    MODEL defaults to the bundled model.
    """
    from minitx import generate as gen

    m = load_model(model)
    backends = _backends(backends)
    tok = m.tokenizer
    if m.is_decoder:
        if texts:
            raise MinitxError("--text is for encoders; use --prompt with a decoder")
        seqs = _inputs(m, prompts, ids, "--prompt")
        stop_ids = [_stop_id(m, s) for s in stops]
        sampling = gen.Sampling(temperature, top_k, top_p, seed)
        stream = not as_json and len(seqs) == 1
        printer = _Streamer(tok, seqs[0]) if stream else None
        result = gen.generate(m, seqs, max_new_tokens, sampling, stop_ids, backends, no_fallback,
                              on_token=(lambda r, t: printer.add(t)) if printer else None)
        if explain:
            print_explain(m.executor(backends, no_fallback))
        if as_json:
            obj: dict[str, Any] = {"token_ids": result}
            if tok is not None:
                obj["texts"] = [tok.decode(r) for r in result]
            click.echo(json.dumps(obj))
        elif printer:
            printer.finish()
        else:
            for r, out in enumerate(result):
                shown = tok.decode(seqs[r] + out) if tok is not None else " ".join(map(str, seqs[r] + out))
                click.echo(f"[{r + 1}] {shown}")
    else:
        if prompts:
            raise MinitxError("--prompt is for decoders; use --text with an encoder")
        seqs = _inputs(m, texts, ids, "--text")
        emb = gen.embed(m, seqs, backends=backends, strict=no_fallback)
        if explain:
            print_explain(m.executor(backends, no_fallback))
        sim = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1)).clip(1e-12)
        if as_json:
            obj = {"embeddings": emb.tolist()}
            if len(seqs) >= 2:
                obj["similarity"] = sim.tolist()
            click.echo(json.dumps(obj))
        elif len(seqs) >= 2:
            labels = list(texts) if texts else [f"ids[{k + 1}]" for k in range(len(seqs))]
            click.echo("cosine similarity:")
            for k, lab in enumerate(labels):
                click.echo(f"  [{k + 1}] {lab[:60]}")
            click.echo("      " + "".join(f"{f'[{k + 1}]':>8}" for k in range(len(seqs))))
            for k in range(len(seqs)):
                click.echo(f"  [{k + 1}] " + "".join(f"{sim[k, j]:8.4f}" for j in range(len(seqs))))
        else:
            np.set_printoptions(precision=5, suppress=True, linewidth=100)
            click.echo(f"embedding ({emb.shape[1]} values):")
            click.echo(np.array2string(emb[0], separator=", "))


def _inputs(m, texts: Sequence[str], ids: Sequence[str], flag: str) -> list[list[int]]:
    if texts and ids:
        raise MinitxError(f"give either {flag} or --ids, not both")
    if ids:
        seqs = [_parse_ids(s) for s in ids]
        check_ids(m, seqs)
        return seqs
    if not texts:
        raise MinitxError(f"nothing to run: give {flag} TEXT or --ids 1,2,3")
    tok = m.tokenizer
    if tok is None:
        raise MinitxError("this model carries no tokenizer; give token ids with --ids 1,2,3")
    if not m.is_decoder and m.config.get("max_seq_length"):
        tok.enable_truncation(int(m.config["max_seq_length"]))
    seqs = [tok.encode(t).ids for t in texts]
    for k, s in enumerate(seqs):
        if not s:
            raise MinitxError(f"{flag} {k + 1} is empty (it has no tokens)")
    check_ids(m, seqs)
    return seqs


def _stop_id(m, s: str) -> int:
    if s.lstrip("-").isdigit():
        return int(s)
    tok = m.tokenizer
    if tok is not None:
        tid = tok.token_to_id(s)
        if tid is None:
            ids = tok.encode(s, add_special_tokens=False).ids
            tid = ids[0] if len(ids) == 1 else None
        if tid is not None:
            return int(tid)
    raise MinitxError(f"--stop {s!r} is neither a token id nor a single token of this model's tokenizer")


class _Streamer:
    """Prints the prompt, then each new token as soon as it decodes to whole characters."""

    def __init__(self, tok, prompt: list[int]) -> None:
        self.tok, self.ids = tok, list(prompt)
        self.shown = tok.decode(self.ids) if tok is not None else " ".join(map(str, prompt))
        click.echo(self.shown, nl=False)

    def add(self, t: int) -> None:
        self.ids.append(t)
        if self.tok is None:
            click.echo(f" {t}", nl=False)
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the rest of the character
        if text.startswith(self.shown):
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text
        sys.stdout.flush()

    def finish(self) -> None:
        click.echo("")


# -------------------------------------------------------------------------------------- show
@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--batch", default=1, show_default=True)
@click.option("--seq", default=None, type=int, help="Tokens in the step (default: the context length).")
@click.option("--past", default=0, show_default=True, help="Tokens already in the KV cache.")
@click.option("--json", "as_json", is_flag=True)
def show(model: str | None, batch: int, seq: int | None, past: int, as_json: bool) -> None:
    """Print the graph: shapes, parameters, FLOPs and bytes per node, with totals."""
    from minitx.report import graph_table

    m = load_model(model)
    seq = seq or (m.n_ctx - past)
    rows, totals = graph_table(m.graph, m.params, {"B": batch, "T": seq, "S": past})
    if as_json:
        click.echo(json.dumps({"config": m.config, "nodes": rows, "totals": totals}))
        return
    click.echo(f"{m.config['arch']} — {m.n_params():,} parameters, {m.nbytes() / 2**20:.1f} MiB; "
               f"shapes for batch={batch}, seq={seq}, past={past}")
    w = max(len(r["node"]) for r in rows)
    click.echo(f"{'node':<{w}}  {'op':<20} {'output shape':<22} {'params':>11} {'MFLOP':>12} {'MB moved':>10}")
    for r in rows:
        click.echo(f"{r['node']:<{w}}  {r['op']:<20} {str(tuple(r['shapes'][0])):<22} {r['params']:>11,} "
                   f"{r['flops'] / 1e6:>12.2f} {r['bytes'] / 1e6:>10.2f}")
    click.echo(f"{'total':<{w}}  {'':<20} {'':<22} {totals['params']:>11,} {totals['flops'] / 1e6:>12.2f} "
               f"{totals['bytes'] / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
