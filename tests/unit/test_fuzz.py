"""Property-based fuzzing (hypothesis): every protocol decoder refuses garbage with a
`ProtocolError` and nothing else; the tree check admits only well-formed trees; and the
acceptance rule, on arbitrary — even hostile — trees, commits exactly what target-only
greedy decoding would."""

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge import protocol
from specedge.engine.acceptance import accept
from specedge.engine.sampling import SamplingParams
from specedge.protocol import DraftTreeMsg, ProtocolError

MESSAGES = [cls for cls in vars(protocol).values()
            if isinstance(cls, type) and issubclass(cls, protocol.Message) and cls is not protocol.Message]
FAST = settings(max_examples=150, deadline=None)

# msgpack-able values, nested: what a hostile peer can put on the bus besides raw bytes
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30)


def test_every_message_type_is_fuzzed():
    assert len(MESSAGES) >= 15


@pytest.mark.parametrize("kind", MESSAGES, ids=lambda k: k.__name__)
@FAST
@given(data=st.binary(max_size=300))
def test_decoders_refuse_random_bytes_with_a_protocol_error(kind, data):
    try:
        message = protocol.decode(data, kind)
    except ProtocolError as exc:
        assert exc.reason in {"oversized", "invalid", "malformed", "version"}
    else:
        assert isinstance(message, kind)


@pytest.mark.parametrize("kind", MESSAGES, ids=lambda k: k.__name__)
@FAST
@given(value=values, fields=st.dictionaries(st.sampled_from(["v", "session_id", "tokens", "parents", "cycle",
                                                             "committed_len", "trees", "role", "instance_id"]),
                                            values, max_size=6))
def test_decoders_refuse_wrongly_typed_structures(kind, value, fields):
    for payload in (value, {"v": protocol.PROTOCOL_VERSION, **fields}):
        try:
            message = protocol.decode(msgspec.msgpack.encode(payload), kind)
        except ProtocolError:
            continue
        assert isinstance(message, kind) and message.v == protocol.PROTOCOL_VERSION


def test_oversized_messages_are_refused_before_decoding():
    with pytest.raises(ProtocolError) as err:
        protocol.decode(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1), protocol.DraftTreeMsg)
    assert err.value.reason == "oversized"


@FAST
@given(tokens=st.lists(st.integers(-5, 40), max_size=40), parents=st.lists(st.integers(-3, 45), max_size=40))
def test_the_tree_check_admits_exactly_the_well_formed_trees(tokens, parents):
    tree = DraftTreeMsg(session_id="s", cycle=0, committed_len=1, tokens=tokens, parents=parents)
    well_formed = (len(tokens) == len(parents) <= 32 and all(0 <= t < 32 for t in tokens)
                   and all(-1 <= p < i for i, p in enumerate(parents)))
    assert (tree.problem(vocab_size=32, max_nodes=32) is None) == well_formed


@st.composite
def trees(draw, vocab=8):
    """Well-formed trees (root first) with arbitrary — possibly repeated — sibling tokens."""
    n = draw(st.integers(0, 20))
    parents = [-1] + [draw(st.integers(0, i)) for i in range(n)]  # node i+1's parent is an earlier node
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n + 1)]
    return tokens, parents


@FAST
@given(tree=trees(), seed=st.integers(0, 2**31 - 1))
def test_greedy_acceptance_commits_what_target_only_decoding_would(tree, seed):
    tokens, parents = tree
    logits = torch.randn(len(tokens), 8, generator=torch.Generator().manual_seed(seed))
    path, bonus = accept(tokens, parents, logits, SamplingParams(), root_position=10)
    node = 0
    for child in path:  # each accepted node is a child of the previous one and the target's own choice
        assert parents[child] == node and tokens[child] == int(logits[node].argmax())
        node = child
    assert bonus == int(logits[node].argmax())
    # and the walk stopped because no child of the last node holds the target's choice
    assert all(not (parents[i] == node and tokens[i] == bonus) for i in range(1, len(tokens)))


@FAST
@given(tree=trees(), seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.1, 2.0), top_p=st.floats(0.05, 1.0))
def test_sampled_acceptance_follows_the_same_draws_on_any_tree(tree, seed, temperature, top_p):
    """Seeded sampling: the committed tokens depend on the target's draws, not on the tree —
    an empty tree (plain decoding) commits the first of them."""
    tokens, parents = tree
    logits = torch.randn(len(tokens), 8, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    path, bonus = accept(tokens, parents, logits, params, root_position=3)
    _, alone = accept(tokens[:1], parents[:1], logits[:1], params, root_position=3)
    first = tokens[path[0]] if path else bonus
    assert first == alone  # the token after the root is the target's draw either way
    assert 0 <= bonus < 8
