"""DeepSeek-V4's attention (V4 report §2.3): shared-KV MQA over a sliding window plus compressed entries.

Interface (what the V4 block calls):

    attn = V4Attention(cfg: ModelConfig, layer_id: int)
    out = attn(x, positions, cache=None)
        x         [B, S, hidden_size]  the block's (normed) input
        positions [B, S] long          absolute positions: arange(S) for a full forward,
                                       cache.length + arange(S) under a ContiguousCache
        cache     None | ContiguousCache (state kept per layer, model/v4/cache.py)
        out       [B, S, hidden_size]

The layer builds its own rotary tables from `positions` (sliding layers: rope_theta;
CSA/HCA layers: compress_rope_theta with YaRN), so the block passes positions, not tables.
"""
