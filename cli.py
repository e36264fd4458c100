"""The ``minitx`` command line (installed as ``minitx.cli``; also ``python -m minitx``).

Each command parses its flags, calls the library and prints the result; what a command computes
lives in ``minitx/``. Every user error — a bad flag value included — is one line on stderr and
exit code 2, printed before anything reaches stdout; ``verify``-style checks that ran but found a
failure exit 1. Tracebacks are reserved for bugs in minitx itself.

Flags mean the same in every command (the README's vocabulary table): ``-n/--max-new-tokens``,
``--batch``, ``--seq``, ``--seed``, ``--threads``, ``-o/--output``, ``--random BxT``; MODEL is
optional wherever a command takes one (the bundled model).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

import click

from minitx import __version__  # first: it sets OpenBLAS's thread timeout before NumPy loads it

import numpy as np  # noqa: E402
from minitx.errors import MinitxError  # noqa: E402
from minitx.outputs import check_output  # noqa: E402


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())   # click >= 8.2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        """Click's own usage errors as one line too (click prints usage and a hint over three)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name or "minitx", complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            if isinstance(e, _NO_ARGS_IS_HELP):   # `minitx` alone: the help, as click prints it
                e.show()
            else:
                click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # non-finite results are
                return super().invoke(ctx)   # refused where they matter (NaN logits, loss); no warning noise
        except MinitxError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minitx")
def main() -> None:
    """minitx: a Transformer engine whose every op is an executable NumPy spec."""


# ------------------------------------------------------------------------------ shared options
class _Option(click.Option):
    """An option whose old spellings (``aliases``) still parse for one release: hidden from
    --help, with a warning on stderr naming the new spelling."""

    def __init__(self, *decls: Any, aliases: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(*decls, **kw)
        self.aliases = tuple(aliases)
        if self.aliases and (self.is_flag or self.multiple or self.count):
            raise TypeError(f"{self.name}: aliases are for options that take one value")

    def add_to_parser(self, parser, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        for old in self.aliases:
            parser.add_option(obj=self, opts=[old], dest=f"{self.name}:{old}", action="store", nargs=self.nargs)

    def consume_value(self, ctx: click.Context, opts):
        for old in self.aliases:
            key = f"{self.name}:{old}"
            if key in opts:
                click.echo(f"warning: {old} is deprecated; use {self.opts[-1]}", err=True)
                if self.name not in opts:
                    opts = {**opts, self.name: opts[key]}
        return super().consume_value(ctx, opts)


class _Finite(click.ParamType):
    """A finite float in [lo, hi] (click's FloatRange lets nan and inf through)."""

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value: Any, param, ctx) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            self.fail(f"{value} must be {'>' if self.lo_open else '>='} {self.lo:g}", param, ctx)
        if self.hi is not None and x > self.hi:
            self.fail(f"{value} must be <= {self.hi:g}", param, ctx)
        return x


class _OutputPath(click.Path):
    """An output file: refused when empty or a folder (before any work)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value: Any, param, ctx) -> str:
        if str(value) == "":
            self.fail("the path is empty", param, ctx)
        return super().convert(value, param, ctx)


COUNT = click.IntRange(min=1)
SEED = click.IntRange(min=0)


def seed_option(help: str = "Random seed (>= 0)."):
    return click.option("--seed", default=0, show_default=True, type=SEED, help=help)


def output_option(help: str = "Model file to write (.npz)."):
    return click.option("-o", "--output", required=True, type=_OutputPath(), help=help)


def model_argument(f):
    """MODEL, optional everywhere: the bundled model when not named."""
    return click.argument("model", required=False, metavar="[MODEL]")(f)


def _configure_threads(ctx: click.Context, param, value: int | None) -> int | None:
    from minitx import threads

    threads.configure(value)
    return value


def threads_option(f):
    """--threads N, for every command that computes: the engine's one thread budget
    (:func:`minitx.threads.configure`), set before any kernel runs."""
    return click.option("--threads", type=click.IntRange(min=0), default=None, expose_value=False,
                        callback=_configure_threads, is_eager=True, metavar="N",
                        help="Threads to compute with (default: every available core).")(f)


def max_new_tokens_option(default: int, help: str = "Tokens to generate.", aliases: Sequence[str] = ()):
    """-n/--max-new-tokens (``aliases``: a command's old spelling, hidden, for one release)."""
    return click.option("-n", "--max-new-tokens", "max_new_tokens", cls=_Option, default=default, show_default=True,
                        type=click.IntRange(min=0), aliases=aliases, help=help)


def batch_option(default: int, help: str = "Sequences per batch.", aliases: Sequence[str] = ()):
    return click.option("--batch", cls=_Option, default=default, show_default=True, type=COUNT, aliases=aliases,
                        help=help)


def seq_option(default: int | None, help: str = "Tokens per sequence.", aliases: Sequence[str] = ()):
    return click.option("--seq", cls=_Option, default=default, show_default=default is not None, type=COUNT,
                        aliases=aliases, help=help)


def backend_options(f):
    f = click.option("--explain", is_flag=True, help="Print which backend ran each node (to stderr).")(f)
    f = click.option("--no-fallback", is_flag=True,
                     help="Make it an error when a node's op is not implemented by the chosen backend(s).")(f)
    f = click.option("--backend", "backends", multiple=True, metavar="NAME",
                     help="Backend to run on, in order of preference (repeatable; default: numpy, the spec).")(f)
    return f


def parallel_option(f):
    return click.option("--parallel", default=None, metavar="tp=N,pp=M",
                        help="Split the model over ranks (docs/parallelism.md): simulated in one process, "
                             "or one part per process under mpiexec.")(f)


def _backends(backends: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for b in backends:
        out.extend(x.strip() for x in b.split(",") if x.strip())
    return tuple(out) or ("numpy",)


def load_model(path: str | None):
    """MODEL, or the bundled model when none is named (non-regular files refused)."""
    from minitx import bundled

    return bundled.load_model(path)


def print_explain(ex) -> None:
    from collections import Counter

    rows = ex.explain()
    width = max(len(n) for n, _, _ in rows)
    for name, op, backend in rows:
        click.echo(f"  {name:<{width}}  {op:<20} {backend}", err=True)
    counts = Counter(b for _, _, b in rows)
    click.echo("  ran on: " + ", ".join(f"{b} {c} node(s)" for b, c in counts.items()), err=True)


# ------------------------------------------------------------------------------------- init
@main.command()
@click.option("--arch", type=click.Choice(["gpt2", "bert", "llama", "t5", "bart", "marian", "transformer"]),
              required=True)
@click.option("--preset", default="tiny", show_default=True, help="tiny, or small / base (per family).")
@seed_option()
@output_option()
def init(arch: str, preset: str, seed: int, output: str) -> None:
    """Write a randomly initialised model, for trying things out."""
    from minitx import modelfile
    from minitx.model import Model

    check_output(output)
    model = Model.from_preset(arch, preset, seed)
    modelfile.save(model, output)
    click.echo(f"wrote {output}: {arch} ({preset}), {model.n_params():,} parameters, "
               f"{model.nbytes() / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------- infer
@main.command()
@model_argument
@click.option("--prompt", "prompts", multiple=True, help="Prompt text for a decoder (repeatable: a batch).")
@click.option("--text", "texts", multiple=True, help="Text to embed with an encoder (repeatable).")
@click.option("--ids", "ids", multiple=True, help="Token ids, comma-separated, instead of text (repeatable).")
@max_new_tokens_option(32)
@click.option("--temperature", default=0.0, show_default=True, type=_Finite(0.0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=_Finite(0.0, 1.0, lo_open=True), help="1 = off.")
@seed_option("Sampling seed (>= 0).")
@click.option("--stop", "stops", multiple=True, help="Stop token: an id, or a string the tokenizer maps to one token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--beams", default=1, show_default=True, type=click.IntRange(min=1),
              help="Beam search width (encoder–decoder models).")
@click.option("--length-penalty", default=1.0, show_default=True, type=_Finite(),
              help="Beam search: a finished beam scores sum(log p) / length^this.")
@click.option("--early-stopping", default="false", show_default=True, type=click.Choice(["false", "true", "never"]),
              help="Beam search: stop an input when N beams are finished (true), when no running beam can "
                   "win (false), or never before the length limit.")
@click.option("--plugin", "plugins", multiple=True, metavar="NAME[:OPTS]",
              help="Apply an optimization plugin in memory first, validated (repeatable; see `minitx plugins`).")
@click.option("--force", is_flag=True, help="Run a --plugin rewrite that exceeds its declared tolerance (warn only).")
@parallel_option
@backend_options
@threads_option
def infer(model: str | None, prompts, texts, ids, max_new_tokens, temperature, top_k, top_p, seed, stops,
          as_json, beams, length_penalty, early_stopping, plugins, force, parallel, backends, no_fallback,
          explain) -> None:
    """Generate text with a decoder, or embed text with an encoder.

    MODEL defaults to the bundled model.
    """
    from minitx import generate as gen
    from minitx import inputs

    m = load_model(model)
    if plugins:
        from minitx.plugin import optimize as _optimize

        m = _optimize(m, plugins, force=force, warn=lambda s: click.echo(s, err=True))
    if parallel:
        from minitx.distributed import prepare

        m = prepare(m, parallel, warn=lambda s: click.echo(s, err=True))
    backends = _backends(backends)
    tok = None if ids else m.tokenizer   # --ids: ids in, ids out; the tokenizer is not even parsed
    from minitx import seq2seq

    if seq2seq.is_encoder_decoder(m):
        if stops:
            raise MinitxError("--stop is for decoder-only models; an encoder–decoder stops at its EOS token")
        seqs = inputs.token_sequences(m, list(prompts) + list(texts), ids, "--text")
        stopping = {"false": False, "true": True, "never": "never"}[early_stopping]
        result = seq2seq.generate(m, seqs, max_new_tokens, gen.Sampling(temperature, top_k, top_p, seed), beams,
                                  length_penalty, stopping, backends, no_fallback)
        if explain:
            for ex in seq2seq.executors(m, backends, no_fallback):  # the encoder part, then the decoder part
                print_explain(ex)
        texts_out = [tok.decode(r) for r in result] if tok is not None else None
        if as_json:
            click.echo(json.dumps({"token_ids": result, **({"texts": texts_out} if texts_out else {})}))
        else:
            for r, out in enumerate(result):
                click.echo(f"[{r + 1}] " + (texts_out[r] if texts_out else " ".join(map(str, out))))
        return
    if beams > 1:
        raise MinitxError("--beams is for encoder–decoder models (t5, bart, marian, transformer)")
    if m.is_decoder:
        if texts:
            raise MinitxError("--text is for encoders; use --prompt with a decoder")
        seqs = inputs.token_sequences(m, prompts, ids, "--prompt")
        stop_ids = [inputs.stop_token(m, s) for s in stops]
        sampling = gen.Sampling(temperature, top_k, top_p, seed)
        printer = _Streamer(tok, seqs[0]) if not as_json and len(seqs) == 1 else None
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
        return
    if prompts:
        raise MinitxError("--prompt is for decoders; use --text with an encoder")
    seqs = inputs.token_sequences(m, texts, ids, "--text")
    emb = gen.embed(m, seqs, backends=backends, strict=no_fallback)
    if explain:
        print_explain(m.executor(backends, no_fallback))
    sim = gen.cosine_similarity(emb)
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


class _Streamer:
    """Prints the prompt and each new token as soon as it decodes to whole characters — from the
    first generated token on, so that a command failing before it (a bad backend, a model that
    does not run) has printed nothing."""

    def __init__(self, tok, prompt: list[int]) -> None:
        self.tok, self.ids = tok, list(prompt)
        self.shown: str | None = None

    def _start(self) -> None:
        if self.shown is None:
            self.shown = self.tok.decode(self.ids) if self.tok is not None else " ".join(map(str, self.ids))
            click.echo(self.shown, nl=False)

    def add(self, t: int) -> None:
        self._start()
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
        self._start()
        click.echo("")


# -------------------------------------------------------------------------------------- show
@main.command()
@model_argument
@batch_option(1)
@seq_option(None, "Tokens in the step (default: the context length less --past).")
@click.option("--past", default=0, show_default=True, type=click.IntRange(min=0), help="Tokens already in the KV cache.")
@click.option("--json", "as_json", is_flag=True)
@parallel_option
def show(model: str | None, batch: int, seq: int | None, past: int, as_json: bool, parallel: str | None) -> None:
    """Print the graph: shapes, parameters, FLOPs and bytes per node, with totals; with --parallel,
    per-rank weight memory and communication instead.

    MODEL defaults to the bundled model."""
    from minitx.cost import model_cost

    m = load_model(model)
    c = model_cost(m, batch, seq, past)
    if parallel:  # per-rank weight memory and communication instead of the node table
        from minitx.distributed import cost_summary
        from minitx.distributed.cost import format_summary

        summ = cost_summary(m, parallel, batch, c["seq"], past)
        click.echo(json.dumps(summ) if as_json else format_summary(summ))
        return
    rows, totals = c["nodes"], c["totals"]
    from minitx import seq2seq
    from minitx.cachebytes import cache_bytes, describe

    s2s = seq2seq.is_encoder_decoder(m)
    cache = cache_bytes(m.graph, batch, c["seq"] + past, c["seq"] if s2s else 0)
    if as_json:
        click.echo(json.dumps({"config": m.config, "nodes": rows, "totals": totals, "cache_bytes": cache}))
        return
    click.echo(f"{m.config['arch']} — {m.n_params():,} parameters, {m.nbytes() / 2**20:.1f} MiB; "
               f"shapes for batch={batch}, seq={c['seq']}, past={past}")
    w = max(len(r["node"]) for r in rows)
    click.echo(f"{'node':<{w}}  {'op':<20} {'output shape':<22} {'params':>11} {'MFLOP':>12} {'MB moved':>10}")
    for r in rows:
        click.echo(f"{r['node']:<{w}}  {r['op']:<20} {str(tuple(r['shapes'][0])):<22} {r['params']:>11,} "
                   f"{r['flops'] / 1e6:>12.2f} {r['bytes'] / 1e6:>10.2f}")
    click.echo(f"{'total':<{w}}  {'':<20} {'':<22} {totals['params']:>11,} {totals['flops'] / 1e6:>12.2f} "
               f"{totals['bytes'] / 1e6:>10.2f}")
    if cache["self"] or cache["cross"]:
        click.echo(f"caches after {c['seq'] + past} decoder tokens" + (f" of {c['seq']}-token sources" if s2s else "")
                   + f", batch {batch}: {describe(cache)}")


def training_options(lr: float, min_lr: float, warmup: int, weight_decay: float):
    """The flags train, distill and qat share: optimizer, schedule, held-out evaluation,
    checkpoints, precision, backends, threads and output; only the learning-rate defaults differ
    (fine-tuning starts lower)."""
    opts = [
        click.option("--steps", default=200, show_default=True, help="Optimizer steps."),
        batch_option(8, "Windows per micro-batch.", aliases=("--batch-size",)),
        seq_option(None, "Tokens per window (default: the context length).", aliases=("--seq-len",)),
        click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step."),
        click.option("--lr", default=lr, show_default=True, help="Peak learning rate."),
        click.option("--min-lr", default=min_lr, show_default=True, help="Learning rate at the end of the cosine decay."),
        click.option("--warmup", default=warmup, show_default=True, help="Linear warm-up steps."),
        click.option("--weight-decay", default=weight_decay, show_default=True,
                     help="Decoupled weight decay (linear matrices only)."),
        click.option("--clip", default=1.0, show_default=True, help="Global gradient-norm clip (0 = off)."),
        click.option("--eval-every", default=50, show_default=True,
                     help="Held-out evaluation every N steps (0 = at the end)."),
        click.option("--eval-batches", default=4, show_default=True, help="Batches of held-out windows per evaluation."),
        click.option("--val-fraction", default=0.05, show_default=True,
                     help="Tail of the text held out for evaluation (never trained on)."),
        seed_option(),
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint file (default: OUTPUT with .ckpt.npz)."),
        click.option("--checkpoint-every", default=100, show_default=True,
                     help="Save a checkpoint every N steps (0 = at the end)."),
        click.option("--resume", type=click.Path(dir_okay=False), default=None,
                     help="Continue from a checkpoint of this command (bit for bit; the run's settings must match)."),
        click.option("--precision", default="float32", show_default=True,
                     help="Compute precision: float32, float16 or bfloat16 (weights and optimizer state stay float32)."),
        click.option("--loss-scale", default=2.0 ** 15, show_default=True,
                     help="Initial dynamic loss scale (float16/bfloat16)."),
        click.option("--loss-scale-growth-interval", default=200, show_default=True,
                     help="Good steps in a row before the loss scale doubles."),
        click.option("--loss-scale-backoff", default=0.5, show_default=True,
                     help="Factor applied to the loss scale when gradients overflow (the step is skipped)."),
        click.option("--backend", "backends", multiple=True, metavar="NAME",
                     help="Backend to run on, in order of preference (repeatable; default: numpy, the spec)."),
        threads_option,
        click.option("--parallel", default=None, metavar="dp=N[,zero=1]|tp=N|pp=N[,mb=K,schedule=1f1b|gpipe]",
                     help="Data parallel (train): each of N ranks a slice of every batch, gradients averaged; "
                          "zero=1 shards the optimizer state. Or tensor (tp) / pipeline (pp, mb micro-batches, "
                          "1F1B or GPipe) parallel: the model split over the ranks. Under mpiexec one rank per "
                          "process, else simulated (docs/parallelism.md)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object."),
        click.option("--quiet", "-q", is_flag=True, help="No progress line."),
    ]

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


def _run_options(p: dict[str, Any], output: str):
    """The shared training flags of the running command, and which of them the user gave."""
    from minitx.training.commands import RunOptions

    ctx = click.get_current_context()
    p["batch_size"], p["seq_len"] = p.pop("batch"), p.pop("seq") or 0   # the settings' (and checkpoints') names
    given = {k for k in p if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    return RunOptions(values=dict(p), given=given, output=output, checkpoint=p.pop("checkpoint"),
                      resume=p.pop("resume"), backends=_backends(p.pop("backends")), quiet=p.pop("quiet"))


# ------------------------------------------------------------------------------------- train
@main.command()
@click.option("--arch", type=click.Choice(["gpt2", "llama", "t5", "bart", "marian", "transformer"]), default=None,
              help="Model family (not needed with --config or --resume); encoder–decoders train on --pairs.")
@click.option("--preset", default="tiny", show_default=True, help="tiny or small: the starting config.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="JSON config; its fields override the preset.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="UTF-8 training text (decoders).")
@click.option("--pairs", "pairs_path", type=click.Path(dir_okay=False),
              help="source<TAB>target lines (encoder–decoders): text with --tokenizer, else token ids.")
@output_option()
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False), help="tokenizer.json to use instead of training one.")
@click.option("--vocab-size", type=int, default=None, help="Train a byte-level BPE of this size (default: the config's vocab_size).")
@click.option("--plugin", "plugins", multiple=True, metavar="NAME[:OPTS]",
              help="Graph rewrite for training that keeps the forward exact: recompute:sqrt (less activation "
                   "memory, same gradients) or activations:int8|fp8 (saved activations in 8 bits, gradients "
                   "approximate); repeatable; kept in checkpoints.")
@training_options(lr=3e-3, min_lr=3e-4, warmup=20, weight_decay=0.1)
def train(arch, preset, config_path, data_path, pairs_path, output, tokenizer_path, vocab_size, as_json, **p) -> None:
    """Train a decoder (GPT-2 or LLaMA style) on a text file, or an encoder–decoder (T5, BART,
    Marian, transformer) on a source<TAB>target file, with AdamW."""
    from minitx.training import commands

    if (data_path is None) == (pairs_path is None):
        raise MinitxError("give one of --data TEXT (a decoder) or --pairs FILE (an encoder–decoder)")
    if pairs_path is not None:
        if vocab_size is not None:
            raise MinitxError("--vocab-size trains a tokenizer on --data; with --pairs give --tokenizer, or token ids")
        rep = commands.train_pairs(_run_options(p, output), pairs_path, arch=arch, preset=preset,
                                   config_path=config_path, tokenizer_path=tokenizer_path)
    else:
        rep = commands.train(_run_options(p, output), data_path, arch=arch, preset=preset, config_path=config_path,
                             tokenizer_path=tokenizer_path, vocab_size=vocab_size)
    if as_json:
        click.echo(json.dumps(rep))
        return
    msg = f"wrote {output} after {rep['steps']} steps ({rep['seconds']:,.0f}s)"
    if rep["val_loss"] is not None:
        msg += f"; held-out loss {rep['val_loss']:.4f}, perplexity {rep['val_perplexity']:.2f}"
    click.echo(msg + f"; checkpoint {rep['checkpoint']}")


# -------------------------------------------------------------------------------------- eval
@main.command("eval")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="UTF-8 text to score.")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: the context length).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plugin", "plugins", multiple=True, metavar="NAME[:OPTS]",
              help="Also score the model rewritten by this plugin (repeatable) and report the perplexity delta.")
@click.option("--precision", default="float32", show_default=True,
              help="Compute precision: float32, float16 or bfloat16 (emulated), as `train --precision` computes.")
@threads_option
@backend_options
def eval_cmd(model, data_path, stride, as_json, backends, no_fallback, explain, plugins=(), precision="float32") -> None:
    """Loss and perplexity of a decoder on a text (sliding windows of its context length).

    MODEL defaults to the bundled model. With --plugin, the rewritten model is scored too.
    With --precision float16|bfloat16 the model runs in that precision (weights cast from float32).
    """
    from minitx.training import commands, evaluation

    m = load_model(model)
    res = commands.evaluate_file(m, data_path, stride=stride, plugins=plugins, backends=_backends(backends),
                                 strict=no_fallback, precision=precision, warn=lambda s: click.echo(s, err=True))
    if explain:
        print_explain(evaluation.executor(m, _backends(backends), no_fallback, precision))
    if as_json:
        click.echo(json.dumps(res))
        return
    in_prec = f" ({precision} compute)" if precision != "float32" else ""
    if not plugins:
        click.echo(f"{res['tokens']:,} tokens in {res['windows']} window(s){in_prec}: loss {res['loss']:.4f} "
                   f"nats/token, perplexity {res['perplexity']:.3f}")
        return
    r = res["rewritten"]
    click.echo(f"{res['tokens']:,} tokens in {res['windows']} window(s){in_prec}")
    click.echo(f"  model:                loss {res['loss']:.4f} nats/token, perplexity {res['perplexity']:.3f}")
    click.echo(f"  with {' + '.join(plugins)}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}")
    click.echo(f"  delta: loss {res['delta_loss']:+.4f}, perplexity {res['delta_perplexity']:+.3f} "
               f"({100 * res['relative_delta_perplexity']:+.2f}%)")


# ---------------------------------------------------------------------------------- backends
@main.command(name="backends")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def backends_cmd(as_json: bool) -> None:
    """List installed backends: device, availability (and why not), version, dtypes, native ops."""
    from minitx.backend import describe, entries

    infos = [describe(name) for name in sorted(entries())]
    if as_json:
        click.echo(json.dumps({"backends": infos}))
        return
    for info in infos:
        if info["available"]:
            click.echo(f"{info['name']:<10} {info['device']:<6} available    version {info['version'] or '-'}; "
                       f"dtypes {', '.join(info['dtypes'])}")
            click.echo(f"{'':<10} forward ({len(info['forward'])}): {', '.join(info['forward'])}")
            click.echo(f"{'':<10} vjp ({len(info['vjp'])}): {', '.join(info['vjp']) or '-'}")
        else:
            click.echo(f"{info['name']:<10} {'-':<6} UNAVAILABLE  {info['reason']}")
            click.echo(f"{'':<10} remedy: {info['remedy']}")


# ------------------------------------------------------------------------------- conformance
@main.command()
@click.option("--backend", "backend_name", required=True, metavar="NAME", help="Backend to check.")
@click.option("--include", default="", metavar="OP,...", help="Only these ops.")
@click.option("--exclude", default="", metavar="OP,...", help="Skip these ops.")
@click.option("--dtype", "dtypes", multiple=True, help="Only these dtypes (default: all the backend supports).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@threads_option
def conformance(backend_name: str, include: str, exclude: str, dtypes, as_json: bool) -> None:
    """Check every op a backend implements (forward and VJP) against the spec; exit 1 on a failure."""
    from minitx.conformance import run_conformance

    def ops_list(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    report = run_conformance(backend_name, ops_list(include) or None, ops_list(exclude) or None,
                             dtypes or None)
    if not report.checked:
        raise MinitxError(f"conformance: nothing was checked ({report.summary()}; no op selected has cases)")
    click.echo(report.to_json() if as_json else report.table())
    if not report.ok:
        sys.exit(1)


# ----------------------------------------------------------------------- convert / golden / verify
@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@output_option()
def convert(src: str, output: str) -> None:
    """Convert a Hugging Face model folder (config.json + model.safetensors) to a minitx model file.

    Supported: GPT2LMHeadModel, BertModel (with sentence-transformers pooling/normalisation),
    LlamaForCausalLM. Weights are read and written one tensor at a time.
    """
    from minitx import convert as cv

    check_output(output, cv.source_files(src))
    plan, tensors = cv.plan(src)
    total = cv.total_bytes(plan, tensors)
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=f"converting {len(plan.params)} tensors", file=sys.stderr,
                               show_percent=True) as bar:
            cv.write(plan, tensors, output, bar.update)
    else:
        cv.write(plan, tensors, output)
    n = total // 4  # every parameter is written as float32
    tok = ", with tokenizer" if plan.tokenizer_json else ", no tokenizer.json"
    extra = ""
    if plan.config["arch"] == "bert":
        extra = f", max_seq_length={plan.config['max_seq_length']}, normalize={plan.config['normalize']}"
    click.echo(f"wrote {output}: {plan.meta['hf_architecture']} -> {plan.config['arch']}, {n:,} parameters, "
               f"{total / 2**20:.1f} MiB{tok}{extra}")


@main.command()
@model_argument
@click.option("--prompt", "prompts", multiple=True, help="Prompt text for a decoder (repeatable: a batch).")
@click.option("--text", "texts", multiple=True, help="Text for an encoder (repeatable).")
@click.option("--ids", "ids", multiple=True, help="Token ids, comma-separated (repeatable).")
@click.option("--random", "random_spec", metavar="BxT", help="A seeded random batch of B rows of up to T tokens.")
@seed_option("Seed for --random (>= 0).")
@click.option("--intermediates", is_flag=True, help="Also store every node's value.")
@click.option("--backend", "backends", multiple=True, metavar="NAME", help="Backend computing the reference (default numpy).")
@output_option("Golden file to write (.npz).")
@threads_option
def golden(model, prompts, texts, ids, random_spec, seed, intermediates, backends, output) -> None:
    """Record a golden file: inputs, outputs (and with --intermediates every node) of MODEL.

    MODEL defaults to the bundled model."""
    from minitx import bundled, inputs
    from minitx import golden as gd

    path = bundled.model_path(model)
    m = load_model(path)
    seqs = inputs.model_inputs(m, prompts, texts, ids, random_spec, seed)
    check_output(output, [path])
    g = gd.record(m, gd.make_feeds(m, seqs), _backends(backends), intermediates)
    g.provenance["model_file"] = os.path.basename(path)
    gd.save(g, output)
    click.echo(f"wrote {output}: {len(seqs)} input(s), {len(g.outputs)} output(s), {len(g.nodes)} node value(s); "
               f"reference {g.provenance['reference']} on {g.provenance['backend']}")


@main.command()
@click.argument("files", nargs=-1, metavar="[MODEL] GOLDEN")
@click.option("--atol", type=_Finite(0.0), default=None, help="Absolute tolerance (default: by dtype).")
@click.option("--rtol", type=_Finite(0.0), default=None, help="Relative tolerance (default: by dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for CI).")
@click.option("--plugin", "plugins", multiple=True, metavar="NAME[:OPTS]",
              help="Rewrite the model with this plugin first (repeatable); the golden table then shows "
                   "what the rewrite costs against the reference.")
@parallel_option
@backend_options
@threads_option
def verify(files, atol, rtol, as_json, plugins, parallel, backends, no_fallback, explain) -> None:
    """Recompute GOLDEN's outputs with MODEL and compare; exit 1 if any value is out of tolerance.

    MODEL defaults to the bundled model; it may be a file `minitx export` wrote (.onnx): ONNX
    Runtime runs it, whatever --backend says. Each value passes when |out - ref| <= atol + rtol*|ref|
    everywhere; "budget" is the worst element's share of that allowance.
    """
    from minitx import golden as gd

    if not 1 <= len(files) <= 2:
        raise click.UsageError(f"expected [MODEL] GOLDEN, got {len(files)} file(s)")
    model, golden_file = (None, *files) if len(files) == 1 else files
    if model is not None and model.endswith(".onnx"):  # a file `minitx export` wrote, run by ONNX Runtime
        from minitx.onnx_export import load as load_onnx

        m, backends = load_onnx(model), ("onnxruntime",)
    else:
        m = load_model(model)
    g = gd.load(golden_file)
    if plugins:
        from minitx.plugin import optimize as _optimize

        # The golden comparison is the judge here, so a rewrite over its own tolerance still runs.
        m = _optimize(m, plugins, force=True, warn=lambda s: click.echo(s, err=True))
    if parallel:
        from minitx.distributed import prepare

        m = prepare(m, parallel, warn=lambda s: click.echo(s, err=True), validate=False)
    backends = _backends(backends)
    rows = gd.verify(m, g, backends, no_fallback, atol, rtol, path=golden_file)
    ok = gd.passed(rows)
    if explain:
        print_explain(m.executor(backends, no_fallback))
    if as_json:
        click.echo(json.dumps({"passed": ok, "backends": list(backends), "reference": g.provenance,
                               "rows": [r.as_dict() for r in rows]}))
    else:
        prov = g.provenance
        click.echo(f"reference: {prov.get('reference', '?')}" + (f" on {prov['backend']}" if prov.get("backend") else "")
                   + f"; checking with {','.join(backends)}")
        click.echo(gd.format_table(rows))
        n_fail = sum(1 for r in rows if r.cmp is not None and not r.cmp.passed)
        click.echo("PASS" if ok else f"FAIL: {n_fail} of {len(rows)} value(s) out of tolerance")
    if not ok:
        sys.exit(1)


# ------------------------------------------------------------------------------ optimize / plugins
@main.command()
@model_argument
@click.option("--plugin", "plugins", multiple=True, required=True, metavar="NAME[:OPTS]",
              help="Plugin and options, e.g. quant:int8 or quant:mode=int4,group=64 (repeatable; applied in "
                   "each plugin's composition order).")
@click.option("--calib", "calib", multiple=True, metavar="SPEC",
              help="Calibration input: text, file:PATH (a text per line), ids:1,2,3, random:BxT or text:TEXT "
                   "(repeatable; default random:4x32).")
@click.option("--calib-seed", default=0, show_default=True, type=SEED, help="Seed of random calibration sequences.")
@click.option("--validate", "validate_specs", multiple=True, metavar="SPEC",
              help="Validate on this input instead (same syntax as --calib, or heldout: the text shipped with "
                   "minitx at every length; repeatable). Default: every 4th --calib sequence is held out from "
                   "calibration and validated on; without --calib, heldout (random ids if no tokenizer).")
@click.option("--force", is_flag=True, help="Keep a rewrite that exceeds its declared tolerance (warn only).")
@output_option()
@click.option("--json", "as_json", is_flag=True, help="Print the rewrite reports as JSON.")
@threads_option
def optimize(model: str | None, plugins, calib, calib_seed: int, validate_specs, force: bool, output: str,
             as_json: bool) -> None:
    """Rewrite a model with optimization plugins, validate it against the original, save it.

    Activation-aware rewrites calibrate on --calib; each rewrite is validated on sequences
    disjoint from those (held out of --calib, or --validate) and refused beyond its declared
    tolerance (decoders: mean KL, top-1 agreement, perplexity change; others: mean cosine)."""
    from minitx import modelfile
    from minitx.plugin import optimize as _optimize
    from minitx.validate import Calibration

    check_output(output, [model, *(s[5:] for s in (*calib, *validate_specs) if s.startswith("file:"))],
                 in_place=[model])   # documented: optimize m.npz -o m.npz rewrites in place
    m = load_model(model)
    cal = Calibration.parse(list(calib), seed=calib_seed, validate=list(validate_specs))
    new = _optimize(m, plugins, calib=cal, force=force, warn=lambda s: click.echo(s, err=True))
    modelfile.save(new, output)
    reports = new.meta["rewrites"][len(m.meta.get("rewrites", [])):]
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "firings"} for r in reports], default=str))
        return
    for r in reports:
        fired = ", ".join(f"{k} x{v}" for k, v in r["fired"].items()) or "nothing matched"
        ratio = r["bytes_before"] / max(r["bytes_after"], 1)
        click.echo(f"{r['spec']}: {fired}; weights {r['bytes_before'] / 2**20:.2f} -> {r['bytes_after'] / 2**20:.2f} "
                   f"MiB ({ratio:.2f}x smaller)")
        v = r.get("validation")
        if v:
            from minitx.validate import OutputReport, ValidationReport

            rep = ValidationReport(v["calibration"], v["n_sequences"], v["tolerance"],
                                   [OutputReport(**o) for o in v["outputs"]], v["layers"], v["perplexity"],
                                   v["passed"], v["failure"], lengths=v.get("lengths", []))
            if r.get("calibration"):
                click.echo(f"  calibrated on {r['calibration']['source']}")
            click.echo(f"  validated on {v['calibration']}: {rep.summary()}")
            worst = min((lr for lr in v["layers"] if "shadow" in lr),
                        key=lambda lr: lr["shadow"]["cosine"] if lr["shadow"]["cosine"] is not None else 1.0,
                        default=None)
            if worst:
                click.echo(f"  worst layer alone (shadow): layer {worst['layer']}, cosine "
                           f"{worst['shadow']['cosine']:.6f}, SQNR {worst['shadow']['sqnr_db']:.1f} dB")
            click.echo(f"  tolerance {v['tolerance']}: "
                       + ("PASS" if v["passed"] else f"FAIL: {v['failure']} (kept: --force)"))
    click.echo(f"wrote {output}")


@main.command(name="plugins")
@click.option("--json", "as_json", is_flag=True)
def plugins_cmd(as_json: bool) -> None:
    """List the optimization plugins found (entry-point group minitx.plugins) and their options."""
    from minitx.plugin import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    for r in rows:
        if not r["available"]:
            click.echo(f"{r['name']:<10} unavailable: {r['error']}")
            if r.get("remedy"):
                click.echo(f"{'':<10} remedy: {r['remedy']}")
            continue
        kind = "exact" if r["exact"] else "approximate"
        click.echo(f"{r['name']:<10} {r['description']} ({kind}; order {r['order']})")
        for k, o in r["options"].items():
            choices = f" [{'|'.join(o['choices'])}]" if o["choices"] else ""
            click.echo(f"    {k}={o['default']}{choices}  {o['help']}")


# ------------------------------------------------------------------------------------- bench
@main.command()
@model_argument
@click.option("--backend", "backends", multiple=True, metavar="NAME[,NAME…]",
              help="A backend configuration to measure (repeatable; comma = preference list; default numpy).")
@click.option("--plugin", "plugin_sets", multiple=True, metavar="P[:OPTS][+P…]",
              help="A plugin set to measure besides the unmodified model (repeatable; '+' joins plugins "
                   "into one set, e.g. quant:int8+recompute).")
@click.option("--vs", "vs", type=click.Choice(["torch"]), default=None,
              help="Also run the same model in PyTorch in this run and report speed ratios against it.")
@click.option("--torch-from", type=click.Path(file_okay=False, exists=True), default=None,
              help="Hugging Face folder the model was converted from: --vs torch then runs it with transformers.")
@click.option("--repeat", default=5, show_default=True, type=COUNT, help="Timed runs per measurement (after the warm-up).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed warm-up runs per measurement.")
@batch_option(4, "The larger batch size (batch 1 is always measured).")
@seq_option(32, "Prompt (or sentence) length in tokens.", aliases=("--prompt-len",))
@max_new_tokens_option(16, "Greedy decode steps timed (decoders).", aliases=("--new-tokens",))
@seed_option("Seed of the random input ids (>= 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--plot", "plot_path", type=_OutputPath(), default=None,
              help="Write a speed-vs-error plot with memory and size bars (PNG/SVG/PDF; needs matplotlib).")
@threads_option
def bench(model, backends, plugin_sets, vs, torch_from, repeat, warmup, batch, seq, max_new_tokens,
          seed, as_json, plot_path) -> None:
    """Measure speed, memory, size and accuracy of MODEL per backend × plugin set.

    MODEL defaults to the bundled model. --threads also sets PyTorch's threads (--vs torch).
    A configuration that cannot run gets its reason in the status column; the others still run.
    Exit code 0 unless nothing could run.
    """
    from minitx import bench as bn
    from minitx import bundled, threads

    s = bn.Settings(repeat=repeat, warmup=warmup, batch=batch, prompt_len=seq, new_tokens=max_new_tokens,
                    seed=seed, threads=threads.budget())
    s.check()
    model = bundled.model_path(model)
    m = load_model(model)
    if plot_path:
        check_output(plot_path, [model])
    sets = [[]] + [bn.parse_plugin_set(p) for p in plugin_sets]
    sets = [p for k, p in enumerate(sets) if p not in sets[:k]]
    backends = list(backends) or ["numpy"]
    total = bn.steps_total(len(backends), len(sets), vs == "torch", m.is_decoder)
    if sys.stderr.isatty():
        with click.progressbar(length=total, label="benchmarking", file=sys.stderr, show_pos=True,
                               item_show_func=lambda x: x) as bar:
            res = bn.run(model, backends, sets, vs == "torch", s, torch_from,
                         progress=lambda n, label: bar.update(n, label), model=m)
    else:  # a log, not a terminal: one line per finished step
        done = [0]

        def log(n: int, label: str) -> None:
            done[0] += n
            click.echo(f"bench [{done[0]}/{total}] {label}", err=True)

        res = bn.run(model, backends, sets, vs == "torch", s, torch_from, progress=log, model=m)
    click.echo(json.dumps(res) if as_json else bn.table(res))
    if plot_path and any(r["status"] == "ok" for r in res["rows"]):
        bn.plot(res, plot_path)
        click.echo(f"wrote {plot_path}", err=as_json)
    if not any(r["status"] == "ok" for r in res["rows"]):
        raise MinitxError("nothing could run: every configuration failed (see the status column)")



# ----------------------------------------------------------------------------------- distill
@main.command()
@click.argument("teacher", required=False, type=click.Path(dir_okay=False))
@click.option("--student-config", "student_cfg", default=None, metavar="JSON|FILE",
              help="A fresh student's config: a JSON file or inline JSON; its fields override the teacher's config.")
@click.option("--student", "student_path", default=None, type=click.Path(dir_okay=False),
              help="Start from this model file instead (a pruned or layer-dropped teacher: optimize --plugin layers:…).")
@click.option("--data", "data_path", default=None, type=click.Path(dir_okay=False),
              help="UTF-8 training text (decoder and encoder teachers).")
@click.option("--pairs", "pairs_path", default=None, type=click.Path(dir_okay=False),
              help="source<TAB>target lines (an encoder–decoder teacher): text for its tokenizer, else token ids.")
@output_option("Student model file to write (.npz).")
@click.option("--loss", "loss_specs", multiple=True, metavar="NAME=WEIGHT",
              help="response | ce | feature | attention, weighted (repeatable; default: response=1); "
                   "an encoder teacher: cosine | hidden | tokens | layers (default: cosine=1).")
@click.option("--temperature", default=2.0, show_default=True, help="Softmax temperature of the response loss.")
@click.option("--layer-map", default=None, metavar="S:T,...",
              help="Student:teacher layer pairs for the feature and attention losses (default: spread evenly).")
@click.option("--baseline", is_flag=True, help="Also train the same student without the teacher, for comparison.")
@max_new_tokens_option(32, "Tokens generated to measure decode speed.", aliases=("--decode-tokens",))
@click.option("--plugin", "plugins", multiple=True, metavar="NAME[:OPTS]",
              help="Exact graph rewrite of the student for training, e.g. recompute:sqrt (repeatable).")
@training_options(lr=3e-3, min_lr=3e-4, warmup=20, weight_decay=0.1)
def distill(teacher, student_cfg, student_path, data_path, pairs_path, output, loss_specs, temperature, layer_map,
            baseline, max_new_tokens, as_json, **p) -> None:
    """Distil TEACHER (default: the bundled model) into a smaller student; report both (and --baseline).

    Checkpoints (student, feature projections, optimizer state) are written as `train` writes
    them; --resume continues one, with the same teacher, text, losses and settings. An encoder
    teacher (bert) is distilled through its sentence embeddings of the text's sentences; the
    held-out ones report the mean cosine between student and teacher. An encoder–decoder teacher
    (t5, bart, marian, transformer) is distilled on --pairs through its next-token distributions;
    the report gives both models' held-out loss and their greedy agreement."""
    from minitx.training import commands
    from minitx.training.distill import table

    rep = commands.distill(_run_options(p, output), teacher, student_cfg, data_path, losses=loss_specs,
                           temperature=temperature, layer_map=layer_map, baseline=baseline,
                           decode_tokens=max_new_tokens, student_path=student_path, pairs_path=pairs_path)
    if as_json:
        click.echo(json.dumps(rep))
        return
    if "greedy_agreement" in rep:
        agree = rep["greedy_agreement"]
        click.echo(f"wrote {output}: {rep['student_params']:,} parameters (teacher {rep['teacher_params']:,}) after "
                   f"{rep['steps']} steps ({rep['seconds']:,.0f}s); held-out ({rep['held_out_pairs']} pairs) loss "
                   f"student {rep['val_loss']:.4f}, teacher {rep['teacher_val_loss']:.4f}"
                   + (f"; greedy outputs agree on {agree:.0%}" if agree is not None else ""))
        return
    if "heldout_cosine" in rep:
        before = rep["heldout_cosine_before"]
        cos = (f"; held-out mean cosine to the teacher ({rep['held_out_sentences']} sentences) "
               + (f"{before:.4f} -> " if before is not None else "") + f"{rep['heldout_cosine']:.4f}"
               if rep["heldout_cosine"] is not None else "")
        click.echo(f"wrote {output}: {rep['student_params']:,} parameters (teacher {rep['teacher_params']:,}) after "
                   f"{rep['steps']} steps ({rep['distill_seconds']:,.0f}s){cos}")
        return
    click.echo(table(rep["models"]))
    click.echo(f"wrote {output} after {rep['steps']} steps ({rep['distill_seconds']:,.0f}s of distillation); "
               f"held-out: {rep['models'][1]['heldout_tokens']:,} tokens, windows of {rep['seq_len']}")


# --------------------------------------------------------------------------------------- qat
@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="UTF-8 fine-tuning text.")
@click.option("--plugin", "plugins", required=True, multiple=True, metavar="quant:MODE[,OPTS]",
              help="The quantization to train for and convert to: quant:int4, quant:int8 or quant:int8_block, "
                   "with the quant plugin's options (group=, embeddings=, skip=); may be repeated with exact "
                   "training rewrites such as recompute:sqrt.")
@output_option("Packed model file to write (.npz).")
@click.option("--calib", "calib", multiple=True, metavar="SPEC", help="Calibration input of the conversion (as in optimize).")
@click.option("--validate", "validate_specs", multiple=True, metavar="SPEC",
              help="Validate the conversion on this input (as in optimize; default: every 4th --calib sequence).")
@click.option("--force", is_flag=True, help="Keep a conversion that exceeds its declared tolerance (warn only).")
@click.option("--no-compare", is_flag=True, help="Skip scoring the float and post-training-quantized models.")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
              help="Where training starts: the float weights, or (quant:int4) GPTQ-rounded ones measured on up to "
                   "256 training sequences of --data; the float model stays the reference.")
@training_options(lr=3e-4, min_lr=3e-5, warmup=10, weight_decay=0.0)
def qat(model, data_path, output, calib, validate_specs, force, no_compare, rounding, as_json, **p) -> None:
    """Quantization-aware fine-tuning: train MODEL through fake quantization, convert, save.

    The held-out tail of the text (--val-fraction) then scores the float model, its post-training
    quantization and the QAT model after conversion. MODEL defaults to the bundled model.
    Checkpoints hold the float weights being fine-tuned; --resume continues one (same MODEL,
    --plugin, text and settings).
    """
    from minitx.training import commands

    rep = commands.qat(_run_options(p, output), model, data_path, p["plugins"], calib=calib,
                       validate=validate_specs, force=force, compare=not no_compare, rounding=rounding,
                       warn=lambda s: click.echo(s, err=True))
    if as_json:
        click.echo(json.dumps(rep))
        return
    packed_text, v = rep["plugin"], rep.get("validation")
    if "float_perplexity" in rep:
        click.echo(f"held-out perplexity ({rep['held_out_tokens']:,} tokens): float {rep['float_perplexity']:.3f}, "
                   f"post-training {packed_text} {rep['ptq_perplexity']:.3f}, "
                   + (f"GPTQ-rounded {rep['gptq_perplexity']:.3f}, " if "gptq_perplexity" in rep else "")
                   + f"QAT {packed_text} {rep['qat_perplexity']:.3f}")
    if "qat_cosine" in rep:
        click.echo(f"held-out mean cosine to the float model ({rep['held_out_sentences']} sentences): "
                   f"post-training {packed_text} {rep['ptq_cosine']:.4f}, "
                   + (f"GPTQ-rounded {rep['gptq_cosine']:.4f}, " if "gptq_cosine" in rep else "")
                   + f"QAT {packed_text} {rep['qat_cosine']:.4f}")
    click.echo(f"packed vs fake-quant {'embeddings' if 'qat_cosine' in rep else 'logits'}: "
               f"max |diff| {rep['packed_vs_fake_quant_max_abs']:.2e}")
    if v:
        click.echo(f"conversion validated on {v['calibration']}: "
                   + ("PASS" if v["passed"] else f"FAIL: {v['failure']} (kept: --force)"))
    click.echo(f"wrote {output} after {rep['steps']} QAT steps")



# ------------------------------------------------------------------------------------- export
@main.command()
@model_argument
@output_option("ONNX file to write (.onnx).")
@click.option("--external-data/--no-external-data", "external_data", default=None,
              help="Store the weights beside the model in OUTPUT.data (default: only when over ONNX's 2 GB limit).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export(model: str | None, output: str, external_data: bool | None, as_json: bool) -> None:
    """Export MODEL (default: the bundled model; any family, any rewrite) to ONNX, checked with
    onnx.checker (full check).

    Inputs and outputs keep the graph's names; a decoder's KV cache is an explicit input
    (past.*) and output (present.*), so a runtime decodes step by step."""
    from minitx import onnx_export

    w = onnx_export.export(load_model(model), output, external_data)
    if as_json:
        click.echo(json.dumps({"path": w.path, "opset": w.opset, "bytes": w.bytes, "external_data": w.external_data,
                               "ops": w.ops}))
        return
    where = f", weights in {w.external_data}" if w.external_data else ""
    click.echo(f"wrote {w.path}: ONNX opset {w.opset}, {w.bytes / 2**20:.1f} MiB{where}; checker: PASS")
    click.echo("ops emitted: " + ", ".join(f"{op} x{n}" for op, n in w.ops.items()))


if __name__ == "__main__":
    main()
