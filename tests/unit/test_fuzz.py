"""Property-based fuzzing (hypothesis): every protocol decoder refuses garbage with a
`ProtocolError` and nothing else; the tree check admits only well-formed trees; and the
acceptance rule, on arbitrary — even hostile — trees, commits exactly what target-only
decoding would, greedy or seeded, with every node carrying its own prefix's logits."""

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge import protocol
from specedge.engine.acceptance import accept, accept_batch
from specedge.engine.sampling import SamplingSpec, sample
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
    """Well-formed trees (as on the wire: -1 is the root) with arbitrary — possibly repeated — sibling tokens."""
    n = draw(st.integers(0, 20))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]  # the root or an earlier node
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    return tokens, parents


def toy_logits(prefix: tuple[int, ...], vocab: int = 8) -> torch.Tensor:
    """A toy target: the logits after `prefix` are a fixed function of the prefix, so every
    tree node has its own row and a rule reading another node's row commits something else."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(hash(prefix) % 2**31)) * 2


def decode_one_at_a_time(context: tuple[int, ...], params: SamplingSpec, root_position: int, n: int) -> list[int]:
    """Target-only decoding: one token per step, drawn at its own absolute position."""
    out: list[int] = []
    for k in range(n):
        out.append(int(sample(toy_logits(context + tuple(out))[None], params, [root_position + 1 + k])[0]))
    return out


params_strategy = st.one_of(
    st.just(SamplingSpec()),
    st.builds(SamplingSpec, temperature=st.floats(0.1, 2.0), top_p=st.floats(0.05, 1.0),
              top_k=st.integers(0, 8), seed=st.integers(0, 2**63 - 1)))


@FAST
@given(tree=trees(), context=st.tuples(st.integers(0, 7), st.integers(0, 7)), params=params_strategy,
       root_position=st.integers(0, 10_000), on_track=st.lists(st.booleans(), min_size=21, max_size=21))
def test_acceptance_on_any_tree_commits_what_target_only_decoding_would(tree, context, params, root_position,
                                                                        on_track):
    """Greedy and seeded sampling, on arbitrary (even hostile: repeated siblings, chains,
    stars) trees whose every node carries its own prefix's logits: the committed tokens are
    the first tokens of one-at-a-time decoding, and the batched rule agrees with the plain one."""
    tokens, parents = list(tree[0]), tree[1]
    expected = decode_one_at_a_time(context, params, root_position, 22)
    prefixes = [context]  # the root's, then each node's
    for i in range(len(tokens)):  # some nodes follow target-only decoding, so paths get accepted
        above = prefixes[parents[i] + 1]
        depth = len(above) - len(context)
        if on_track[i] and above[len(context):] == tuple(expected[:depth]):
            tokens[i] = expected[depth]
        prefixes.append(above + (tokens[i],))
    logits = torch.stack([toy_logits(p) for p in prefixes])
    path, bonus = accept(tokens, parents, logits, params, root_position)
    committed = [tokens[i] for i in path] + [bonus]
    assert committed == expected[: len(committed)]
    node = -1
    for child in path:  # each accepted node is a child of the one before
        assert parents[child] == node
        node = child
    # the walk stopped because no child of the last node carries the target's next token
    assert all(not (parents[i] == node and tokens[i] == bonus) for i in range(len(tokens)))
    assert accept_batch([(tokens, parents)], logits, [params], [root_position]) == [(path, bonus)]


penalties = st.builds(SamplingSpec, temperature=st.sampled_from([0.0, 0.8, 1.3]), seed=st.integers(0, 2**63 - 1),
                      presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
                      repetition_penalty=st.floats(0.5, 3), min_p=st.floats(0, 0.5),
                      logit_bias=st.dictionaries(st.integers(0, 7), st.floats(-5, 5), max_size=3),
                      min_tokens=st.integers(0, 6), end_ids=st.lists(st.integers(0, 7), max_size=2))


@FAST
@given(tree=trees(), context=st.tuples(st.integers(0, 7), st.integers(0, 7)), params=penalties,
       root_position=st.integers(0, 10_000), on_track=st.lists(st.booleans(), min_size=21, max_size=21),
       done=st.lists(st.integers(0, 7), max_size=3))
def test_penalties_over_each_nodes_own_path_commit_what_target_only_decoding_would(tree, context, params,
                                                                                 root_position, on_track, done):
    """With penalties, min-p and a logit bias, a tree commits exactly the tokens that
    one-at-a-time decoding commits: each node is adjusted for its own path's output."""
    prefix = context + tuple(done)  # `done`: output committed before this tree
    tokens, parents = list(tree[0]), tree[1]
    expected = decode_penalized_after(context, done, params, root_position, 22)
    prefixes = [prefix]
    for i in range(len(tokens)):
        above = prefixes[parents[i] + 1]
        depth = len(above) - len(prefix)
        if on_track[i] and above[len(prefix):] == tuple(expected[:depth]):
            tokens[i] = expected[depth]
        prefixes.append(above + (tokens[i],))
    logits = torch.stack([toy_logits(p) for p in prefixes])
    history = (list(context), list(done))
    path, bonus = accept(tokens, parents, logits, params, root_position, history)
    committed = [tokens[i] for i in path] + [bonus]
    assert committed == expected[: len(committed)]
    assert accept_batch([(tokens, parents)], logits, [params], [root_position], [history]) == [(path, bonus)]


def decode_penalized_after(context, done, params, root_position, n):
    """`decode_penalized` continuing after output `done` (its positions already taken)."""
    out = list(done)
    for k in range(n):
        row = toy_logits(tuple(context) + tuple(out))[None]
        out.append(int(sample(row, params, [root_position + 1 + k], [(list(context), list(out))])[0]))
    return out[len(done):]
