"""CSA's sparse decode (V4 report eq. 17): a cached forward reads only the indexer's top-k compressed entries, through the state's `gather_entries`, and gives the masked full forward's logits."""

import pytest
import torch

from nanoseek.config.model_config import CSA
from nanoseek.config.presets import preset
from nanoseek.model.cache import ContiguousCache
from nanoseek.model.transformer import CausalLM
from nanoseek.model.v4.attention import V4Attention
from nanoseek.model.v4.cache import CompressorState
from nanoseek.model.v4.compressor import Compressor
from nanoseek.model.v4.indexer import Indexer
from tests.conftest import randomize

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
TOPK = 4  # m = 4: a CSA layer turns sparse once it holds 5 entries, i.e. from token 20 on


def sparse_config(**overrides):
    """tiny-v4's layer kinds (sliding, CSA, HCA, CSA), shrunk, the indexer keeping 4 entries."""
    base = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8,
                q_lora_rank=24, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16,
                index_topk=TOPK, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                num_nextn_predict_layers=0, max_position_embeddings=256)
    return preset("tiny-v4", **{**base, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(CausalLM(sparse_config())).eval()


def ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(seed))


class Reads:
    """Records what the CSA layers read: every `gather_entries` index tensor, the entries
    tensor each `attend` call of a CSA layer got (the compressed keys of its softmax), and
    whether each CSA attention compressor (not the indexer's) was asked for all its entries."""

    def __init__(self, monkeypatch):
        self.idx, self.gathered, self.attended, self.read_all = [], [], [], []
        gather, attend, compress = CompressorState.gather_entries, V4Attention.attend, Compressor.compress

        def gather_entries(state, idx):
            out = gather(state, idx)
            self.idx.append(idx.shape)
            self.gathered.append(out)
            return out

        def recording_attend(layer, q, blocks, window_mask, entries=None, entry_mask=None):
            if layer.layer_type == CSA:
                self.attended.append(entries)
            return attend(layer, q, blocks, window_mask, entries, entry_mask)

        def recording_compress(c, x, rotary, state, read=True):
            if c.overlap and not isinstance(c, Indexer):
                self.read_all.append(read)
            return compress(c, x, rotary, state, read)

        monkeypatch.setattr(CompressorState, "gather_entries", gather_entries)
        monkeypatch.setattr(V4Attention, "attend", recording_attend)
        monkeypatch.setattr(Compressor, "compress", recording_compress)

    def clear(self):
        self.idx.clear(), self.gathered.clear(), self.attended.clear(), self.read_all.clear()


# ------------------------------------------------------------------ the model's outputs
def test_cached_decode_equals_the_masked_full_forward(model):
    """Prefill (one chunk, or chunks whose early queries see fewer than k entries) then token by
    token through a cache, sparse once the CSA layers hold more than index_topk entries: the
    logits of the full forward, which masks every entry."""
    x = ids(2, 72, seed=1)  # 18 CSA entries at the end
    with torch.no_grad():
        full = model(x)
        for chunks in ([30] + [1] * 42, [6, 30, 1, 1, 34]):
            cache, start = ContiguousCache(2, 72), 0
            for n in chunks:
                logits = model(x[:, start:start + n], cache=cache)
                assert (logits - full[:, start:start + n]).abs().max().item() <= TOL, (chunks, start)
                start += n
    assert full.abs().max() > 0.5


def test_generate_is_the_full_forward_greedy(model, monkeypatch):
    reads = Reads(monkeypatch)
    prompt = ids(2, 25, seed=2)
    out = model.generate(prompt, max_new_tokens=30)
    assert len(reads.idx) > 0, "the sparse path never ran"
    with torch.no_grad():
        greedy = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 25:], greedy[:, 24:])


# ---------------------------------------------------------------- what the sparse path reads
def test_decode_reads_only_k_entries_per_query_through_gather_entries(model, monkeypatch):
    """Each decode step, each CSA layer files its new entries without reading them back
    (compress read=False), gathers [B, 1, k] entry numbers through the state's
    `gather_entries`, and its softmax runs over exactly the [B, 1, k, D] it returned: never the
    tensor of every entry."""
    reads = Reads(monkeypatch)
    n_csa = sum(layer_type == CSA for layer_type in model.config.layer_types)
    x = ids(2, 40, seed=3)
    cache = ContiguousCache(2, 40)
    with torch.no_grad():
        model(x[:, :32], cache=cache)  # 8 entries > k: the prefill is sparse too
        assert reads.idx == [(2, 32, TOPK)] * n_csa and reads.read_all == [False] * n_csa
        reads.clear()
        for t in range(32, 40):
            model(x[:, t:t + 1], cache=cache)
    assert reads.idx == [(2, 1, TOPK)] * (n_csa * 8)
    assert len(reads.attended) == n_csa * 8 and reads.read_all == [False] * (n_csa * 8)
    for gathered, attended in zip(reads.gathered, reads.attended):
        assert attended is gathered and attended.shape == (2, 1, TOPK, model.config.head_dim)


@pytest.mark.parametrize("case", ["full forward", "training", "dense warm-up", "few entries"])
def test_the_masked_path_stays(case, monkeypatch):
    """No cache, a training forward, indexer_mode "dense", or no more entries than index_topk:
    attention scores every entry under a mask, as training's KL target needs."""
    cfg = sparse_config(indexer_mode="dense") if case == "dense warm-up" else sparse_config()
    net = randomize(CausalLM(cfg)).train(case == "training")
    reads = Reads(monkeypatch)
    length = 19 if case == "few entries" else 40  # 4 entries = k, or 10
    x = ids(1, length, seed=4)
    with torch.no_grad():
        net(x, cache=None if case == "full forward" else ContiguousCache(1, length))
    assert reads.idx == [] and reads.read_all and all(reads.read_all)
    assert all(e.dim() == 3 for e in reads.attended) and reads.attended


# --------------------------------------------------------------------------- the tie rule
def test_top_k_ties_go_to_the_earlier_entry_and_match_select():
    """Equal scores: the earlier entries win, in ascending order; a query that sees fewer than
    k entries gets unseen ones marked invalid; {idx | valid} is `select`'s mask."""
    indexer = Indexer(sparse_config())  # k = 4
    scores = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # 1 beats the tied zeros
                            [2.0, 0.0, 0.0, 2.0, 0.0, 2.0, 2.0],  # four tied at the top
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied
                            [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])  # sees 3 entries only
    visible = torch.ones_like(scores, dtype=torch.bool)
    visible[0, 3, 3:] = False
    scores = scores.masked_fill(~visible, float("-inf"))
    idx, valid = indexer.top_k(scores, visible)
    assert idx.tolist() == [[[0, 1, 2, 3], [0, 3, 5, 6], [0, 1, 2, 3], [0, 1, 2, 3]]]
    assert valid.tolist() == [[[True] * 4] * 3 + [[True, True, True, False]]]
    chosen = torch.zeros_like(visible).scatter_(-1, idx, valid)
    assert torch.equal(chosen, indexer.select(scores, visible))


def test_sparse_layer_with_tied_scores_reads_the_first_entries():
    """An indexer whose scores are all 0 (weights_proj = 0): every query's top-k is entries
    0 ... k-1, and the cached CSA layer still equals its masked full forward."""
    cfg = sparse_config()
    attn = V4Attention(cfg, cfg.layer_types.index(CSA))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.3 * torch.randn(p.shape, generator=g))
        attn.compressor.indexer.scorer.weights_proj.weight.zero_()
    attn.eval()
    x = torch.randn(2, 40, cfg.hidden_size, generator=g)
    pos = torch.arange(40).expand(2, 40)
    picked = []
    original = attn.compressor.indexer.top_k
    attn.compressor.indexer.top_k = lambda s, v: picked.append(original(s, v)) or picked[-1]
    with torch.no_grad():
        full = attn(x, pos)
        cache = ContiguousCache(2, 40)
        out = [attn(x[:, :24], pos[:, :24], cache)]
        out += [attn(x[:, t:t + 1], pos[:, t:t + 1], cache) for t in range(24, 40)]
    assert len(picked) == 17
    for idx, valid in picked:
        assert (idx == torch.arange(TOPK)).all() and valid[:, -1].all()
    assert (torch.cat(out, dim=1) - full).abs().max().item() <= TOL
