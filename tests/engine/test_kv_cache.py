"""The growing KV cache layer: the same keys and values as transformers' DynamicLayer through
updates, row filtering and re-assignment, written in place while the headroom lasts."""
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from engine.kv_cache import GROW_MIN, GrowingLayer, make_growing


def kv(batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, n, 8), torch.randn(batch, 2, n, 8)


def test_updates_match_the_dynamic_layer_and_write_in_place():
    torch.manual_seed(0)
    ref, grown = DynamicLayer(), GrowingLayer()
    k, v = kv(3, 10)
    ref.update(k, v)
    grown.update(k, v)
    buffer = grown._k.data_ptr()
    for _ in range(GROW_MIN):  # within the headroom: no new buffer
        k, v = kv(3, 1)
        rk, rv = ref.update(k, v)
        gk, gv = grown.update(k, v)
        assert torch.equal(rk, gk) and torch.equal(rv, gv)
    assert grown._k.data_ptr() == buffer and grown.get_seq_length() == 10 + GROW_MIN
    k, v = kv(3, 50)  # past it: a bigger buffer, same contents
    assert torch.equal(ref.update(k, v)[0], grown.update(k, v)[0])
    assert grown.capacity >= grown.get_seq_length() + GROW_MIN


def test_assigning_rows_and_positions_like_the_engine_does():
    torch.manual_seed(1)
    ref, grown = DynamicLayer(), GrowingLayer()
    k, v = kv(4, 20)
    ref.update(k, v)
    grown.update(k, v)
    index = torch.tensor([2, 0])
    for layer in (ref, grown):  # engine/backend.py keep(): rows kept, leading padding dropped
        layer.keys = layer.keys[index, :, 5:]
        layer.values = layer.values[index, :, 5:]
    assert torch.equal(ref.keys, grown.keys) and torch.equal(ref.values, grown.values)
    k, v = kv(2, 1)
    rk, rv = ref.update(k, v)
    gk, gv = grown.update(k, v)
    assert torch.equal(rk, gk) and torch.equal(rv, gv) and gk.shape == (2, 2, 16, 8)


def test_make_growing_converts_a_filled_dynamic_cache():
    torch.manual_seed(2)
    cache = DynamicCache()
    k, v = kv(1, 4)
    cache.update(k, v, 0)
    make_growing(cache)
    assert isinstance(cache.layers[0], GrowingLayer) and torch.equal(cache.layers[0].keys, k)
    k2, v2 = kv(1, 1)
    keys, _ = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k, k2], dim=2)) and cache.get_seq_length() == 5


def test_layers_grow_on_different_steps_with_the_same_contents():
    """All layers fill up at the same step; growing them all then made that step twice as long.
    A converted cache's layers grow STAGGER apart, one (or a few) per step, contents unchanged."""
    from engine.kv_cache import STAGGER

    torch.manual_seed(3)
    layers = 4
    cache, ref = DynamicCache(), DynamicCache()
    for i in range(layers):
        k, v = kv(2, 10)
        cache.update(k, v, i)
        ref.update(k, v, i)
    make_growing(cache)
    assert [layer.early for layer in cache.layers] == [i % STAGGER for i in range(layers)]
    grew: dict[int, list[int]] = {i: [] for i in range(layers)}
    for step in range(3 * GROW_MIN):
        for i, layer in enumerate(cache.layers):
            before = layer._k.data_ptr() if layer._k is not None else None
            k, v = kv(2, 1)
            keys, values = cache.update(k, v, i)
            rk, rv = ref.update(k, v, i)
            assert torch.equal(keys, rk) and torch.equal(values, rv)
            if layer._k.data_ptr() != before:
                grew[i].append(step)
    # The first step grows them all (a converted cache has no headroom), to one size; from then
    # on never two layers in the same step.
    assert all(steps[0] == 0 for steps in grew.values())
    firsts = [steps[1] for steps in grew.values()]
    assert len(set(firsts)) == layers
    assert firsts == sorted(firsts, reverse=True)  # the later layers first, one step apart
    assert firsts[0] - firsts[-1] == layers - 1


def _filled(batch: int, n: int, seed: int) -> tuple[DynamicLayer, GrowingLayer]:
    torch.manual_seed(seed)
    ref, grown = DynamicLayer(), GrowingLayer()
    k, v = kv(batch, n)
    ref.update(k, v)
    grown.update(k, v)  # its own buffer, with headroom
    return ref, grown


def _kept(ref: DynamicLayer, rows: list[int], start: int) -> None:
    index = torch.tensor(rows)
    ref.keys, ref.values = ref.keys[index, :, start:], ref.values[index, :, start:]


def test_rows_leaving_move_up_in_the_buffer_without_allocating():
    """engine/backend.py keep(): a row leaves and the leading padding goes. The rows after it
    move up inside the buffer and the padding is cut off by a view: no new buffer (a long row
    leaving stalled the others 60-130 ms copying everything), the headroom stays, and the
    contents and the next updates equal transformers' DynamicLayer."""
    ref, grown = _filled(4, 20, 4)
    storage, capacity = grown._k.untyped_storage().data_ptr(), grown.capacity
    _kept(ref, [0, 2, 3], 5)
    grown.keep_rows([0, 2, 3], 5)
    assert torch.equal(ref.keys, grown.keys) and torch.equal(ref.values, grown.values)
    assert grown._k.untyped_storage().data_ptr() == storage and grown.capacity == capacity - 5
    for _ in range(capacity - 20 - 1):  # the rest of the headroom: written in place
        k, v = kv(3, 1)
        rk, rv = ref.update(k, v)
        gk, gv = grown.update(k, v)
        assert torch.equal(rk, gk) and torch.equal(rv, gv)
    assert grown._k.untyped_storage().data_ptr() == storage


def test_a_buffer_that_may_be_shared_or_rows_out_of_order_are_copied():
    """A buffer assigned from outside (e.g. a prefix cache entry's tensors, which the engine's
    first join adopts as they are) is never written over: its rows are copied out instead, as
    are rows kept in another order."""
    torch.manual_seed(5)
    k, v = kv(3, 12)
    shared_k, shared_v = k.clone(), v.clone()
    ref, grown = DynamicLayer(), GrowingLayer()
    ref.update(k.clone(), v.clone())
    grown.keys, grown.values = k, v
    assert not grown.owned
    _kept(ref, [1, 2], 2)
    grown.keep_rows([1, 2], 2)
    assert torch.equal(k, shared_k) and torch.equal(v, shared_v)  # untouched
    assert torch.equal(ref.keys, grown.keys) and grown.owned and grown.capacity >= 10 + GROW_MIN
    ref, grown = _filled(4, 9, 6)
    _kept(ref, [3, 1], 0)
    grown.keep_rows([3, 1], 0)
    assert torch.equal(ref.keys, grown.keys) and torch.equal(ref.values, grown.values)


def test_an_oversized_buffer_is_given_back_one_layer_per_step():
    """When a long row leaves, its positions stay in the buffers (a view cuts them off): each
    layer gives them back when it next fits a stagger slot, one layer per step, with the same
    contents."""
    from engine.kv_cache import STAGGER

    torch.manual_seed(7)
    layers, long = 6, 600
    cache, ref = DynamicCache(), DynamicCache()
    for i in range(layers):
        k, v = kv(3, long)
        cache.update(k, v, i)
        ref.update(k, v, i)
    make_growing(cache)
    for i in range(layers):  # one step gives them buffers of their own (owned)
        k, v = kv(3, 1)
        cache.update(k, v, i)
        ref.update(k, v, i)
    # The long row 0 leaves; the other two only use the last 40 positions.
    for layer, r in zip(cache.layers, ref.layers):
        layer.keep_rows([1, 2], long + 1 - 40)
        _kept(r, [1, 2], long + 1 - 40)
    sizes = [layer._k.untyped_storage().nbytes() for layer in cache.layers]
    shrank: dict[int, int] = {}
    for step in range(STAGGER):
        for i, layer in enumerate(cache.layers):
            k, v = kv(2, 1)
            keys, values = cache.update(k, v, i)
            rk, rv = ref.update(k, v, i)
            assert torch.equal(keys, rk) and torch.equal(values, rv)
            if i not in shrank and layer._k.untyped_storage().nbytes() < sizes[i] // 4:
                shrank[i] = step
    assert sorted(shrank) == list(range(layers))  # every layer gave its memory back ...
    assert len(set(shrank.values())) == layers    # ... each on a step of its own


def test_a_prompt_cache_expecting_its_length_is_written_in_place_then_staggers_in_a_batch():
    """A long prompt's cache (``expecting`` its length) takes one buffer per layer for the whole
    prompt: every chunk lands in it, with the keys and values of transformers' own cache. Handed
    to a batch (``make_growing``), its layers grow on staggered steps like any other."""
    from transformers import LlamaConfig

    from engine.kv_cache import STAGGER, expecting

    torch.manual_seed(3)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32)
    ref, cache = DynamicCache(config=config), expecting(DynamicCache(config=config), 100)
    buffers = None
    for size in (32, 32, 32, 4):  # the chunks of a 100-token prompt
        for i in range(3):
            k, v = kv(1, size)
            rk, rv = ref.update(k, v, i)
            gk, gv = cache.update(k, v, i)
            assert torch.equal(rk, gk) and torch.equal(rv, gv)
        ptrs = [layer._k.data_ptr() for layer in cache.layers]
        assert buffers is None or ptrs == buffers  # written in place: no new buffer per chunk
        buffers = ptrs
    assert all(layer.capacity == 100 for layer in cache.layers)
    make_growing(cache)
    assert [layer.early for layer in cache.layers] == [i % STAGGER for i in range(3)]
    assert all(layer.expect == 0 for layer in cache.layers)
