"""Engine commands: `nanoseek generate DIR --prompt ...`, streaming to the terminal."""

from __future__ import annotations

import typer


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"--prompt-ids {text!r}: expected integers separated by commas") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        path: str = typer.Argument(..., help="checkpoint directory (config.json + safetensors [+ tokenizer.json])"),
        prompt: list[str] = typer.Option(None, "--prompt", "-p", help="prompt text; repeat for a batch"),
        prompt_ids: list[str] = typer.Option(None, "--prompt-ids",
                                             help="prompt as token ids '1,2,3' (checkpoints without a tokenizer); repeatable"),
        max_tokens: int = typer.Option(64, help="tokens to generate at most per prompt"),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        top_k: int = typer.Option(0, help="keep the k most likely tokens (0 = off)"),
        top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
        min_p: float = typer.Option(0.0, help="drop tokens below min_p x the top probability"),
        seed: int = typer.Option(None, help="per-request seed (same seed, same text)"),
        stop: list[str] = typer.Option(None, "--stop", help="stop string; repeatable"),
        stop_token_ids: str = typer.Option("", help="comma-separated token ids that end a request"),
        ignore_eos: bool = typer.Option(False, help="keep going past the end-of-sequence token"),
        speculative: bool = typer.Option(None, "--speculative/--no-speculative",
                                         help="MTP speculative decoding (default: on when the checkpoint has MTP layers)"),
        kv_cache_memory: str = typer.Option(None, help="KV-cache budget: bytes (e.g. 512MiB, 2e9) or a fraction of "
                                                       "free memory [default: 0.9 on a GPU, 0.05 on CPU]"),
        block_size: int = typer.Option(16, help="tokens per cache block"),
        device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda"),
        threads: int = typer.Option(None, help="CPU threads for torch (default: torch's choice; 1 is often "
                                               "fastest for tiny models or on a busy machine)"),
    ):
        """Generate from a checkpoint with the paged-latent-cache engine, streaming the text
        as it is produced. Several --prompt options run as one continuously batched load."""
        import sys
        import time

        from rich.console import Console

        import torch

        from nanoseek.engine import LLM, SamplingParams
        from nanoseek.engine.outputs import stable_text
        if threads:
            torch.set_num_threads(threads)

        prompts = list(prompt or []) + [_ids(p) for p in (prompt_ids or [])]
        if not prompts:
            raise typer.BadParameter("give at least one --prompt or --prompt-ids")
        try:
            params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                    max_tokens=max_tokens, stop=stop or None, stop_token_ids=_ids(stop_token_ids),
                                    ignore_eos=ignore_eos)
            llm = LLM(path, device=device, kv_cache_memory=kv_cache_memory, block_size=block_size,
                      speculative=speculative)
            engine = llm.engine
            seqs = [engine.add_request(p, params) for p in prompts]
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from None
        console = Console(stderr=True)

        def new_part(seq, done: int) -> tuple[str, int]:
            """What to print of seq's output beyond the first `done` units (chars or ids)."""
            if engine.tokenizer is None:
                ids = seq.output_token_ids[done:]
                return "".join(f" {t}" for t in ids), done + len(ids)
            text = stable_text(seq)  # holds back half characters and a tail that may become a stop string
            return text[done:], max(done, len(text))

        t0, printed, reported = time.perf_counter(), 0, set()
        if len(seqs) == 1:
            sys.stdout.write(seqs[0].prompt if seqs[0].prompt is not None else " ".join(map(str, prompts[0])))
        while engine.has_unfinished():
            engine.step()
            if len(seqs) == 1:  # one prompt: stream its text as it grows
                part, printed = new_part(seqs[0], printed)
                sys.stdout.write(part)
                sys.stdout.flush()
            else:  # a batch: print each request as it completes
                for i, s in enumerate(seqs):
                    if s.finished and i not in reported:
                        reported.add(i)
                        console.rule(f"[{i}] finish={s.finish_reason}")
                        print((s.prompt or " ".join(map(str, prompts[i]))) + new_part(s, 0)[0], flush=True)
        elapsed = time.perf_counter() - t0
        if len(seqs) == 1:
            sys.stdout.write("\n")
        n = sum(len(s.output_token_ids) for s in seqs)
        line = f"{n} tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tok/s)"
        if engine.speculative:
            line += f", MTP acceptance {engine.spec_stats.acceptance_rate:.1%} of {engine.spec_stats.drafted} drafts"
        console.print(f"[dim]{line}[/dim]")
