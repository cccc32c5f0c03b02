"""Insertion on one shard: fill, class quotas, equal retention within a class (statistical),
and the one-rank ledger against the general one."""

import random

import torch
from scipy.stats import chisquare

from avalanche_distributed_rehearsal.core import ClassLedger, LocalReservoir, SmallLedger
from avalanche_distributed_rehearsal.core.deal import UNBOUNDED
from avalanche_distributed_rehearsal.core.ledger import FREE


def steps(labels, per_step):
    for i in range(0, len(labels), per_step):
        yield labels[i: i + per_step]


def run_reservoir(capacity, labels, seed, per_step=5, ledger_cls=SmallLedger):
    """Offer ``labels`` (sample ``i`` has label ``labels[i]``) ``per_step`` at a time to one
    shard; return ``(ledger, reservoir, {slot: sample id})``."""
    ledger = ledger_cls(capacity, [capacity], seed)
    res = LocalReservoir(capacity, seed=seed)
    holder = {}
    sid = 0
    for step, chunk in enumerate(steps(labels, per_step)):
        keys = torch.tensor([chunk], dtype=torch.int64).view(1, -1)
        decisions = ledger.apply(keys, torch.tensor([len(chunk)]), step, 0)
        positions, slots = res.apply(chunk, decisions)
        for p, s in zip(positions, slots):
            holder[s] = sid + p
        sid += len(chunk)
    return ledger, res, holder


def test_fills_to_min_capacity_seen_and_never_exceeds():
    _, res, holder = run_reservoir(50, [i % 3 for i in range(30)], seed=0)
    assert res.size == 30 == len(holder)
    _, res, holder = run_reservoir(50, [i % 3 for i in range(500)], seed=0)
    assert res.size == 50 == len(set(holder.values()))


def test_quotas_adapt_as_classes_appear():
    labels = [0] * 100 + [1] * 100 + [2] * 100 + [3] * 100
    _, res, _ = run_reservoir(40, labels, seed=1)
    assert res.class_counts() == {0: 10, 1: 10, 2: 10, 3: 10}
    _, res, _ = run_reservoir(40, labels[:200], seed=1)
    assert res.class_counts() == {0: 20, 1: 20}


def test_more_classes_than_slots_keeps_one_of_each_highest_priority_class():
    labels = [c for c in range(10) for _ in range(5)]
    ledger, res, _ = run_reservoir(4, labels, seed=2)
    assert res.size == 4 and set(res.class_counts().values()) <= {0, 1}
    targets, _ = ledger.targets()
    kept = {c for c, n in res.class_counts().items() if n}
    assert kept == {ledger.labels[i] for i, t in enumerate(targets.tolist()) if t}


def test_bookkeeping_is_consistent_with_the_ledger():
    rng = random.Random(3)
    labels = [rng.randrange(7) for _ in range(2000)]
    ledger = SmallLedger(25, [25], 3)
    res = LocalReservoir(25, seed=3)
    for step, chunk in enumerate(steps(labels, 4)):
        decisions = ledger.apply(torch.tensor([chunk]), torch.tensor([len(chunk)]), step, 0)
        res.apply(chunk, decisions)
        slots = [s for v in res.slots_by_class.values() for s in v]
        assert sorted(slots) == list(range(res.size))
        for c, v in res.slots_by_class.items():
            assert all(res.label_of_slot[s] == c for s in v)
        ledger.check_rank(0, res.class_counts())


def retention_counts(policy, capacity, labels, seeds):
    counts = [0] * len(labels)
    for seed in range(seeds):
        holder = policy(capacity, labels, seed)[-1]
        for sid in holder.values():
            counts[sid] += 1
    return counts


def random_replacement(capacity, labels, seed):
    """The reference C++ policy: a full buffer replaces a random slot. Biased to recent data."""
    rng = random.Random(seed)
    holder = {}
    for sid in range(len(labels)):
        if len(holder) < capacity:
            holder[len(holder)] = sid
        else:
            holder[rng.randrange(capacity)] = sid
    return None, holder


LABELS = [0] * 40 + [1, 0] * 30 + [2] * 20 + [0, 1, 2] * 10


def test_every_sample_of_a_class_is_retained_with_equal_probability():
    counts = retention_counts(run_reservoir, 12, LABELS, seeds=3000)
    for c in (0, 1, 2):
        observed = [counts[i] for i, y in enumerate(LABELS) if y == c]
        assert chisquare(observed).pvalue > 1e-3, (c, observed)


def test_the_statistical_test_detects_a_biased_policy():
    counts = retention_counts(random_replacement, 12, LABELS, seeds=3000)
    observed = [counts[i] for i, y in enumerate(LABELS) if y == 0]
    assert chisquare(observed).pvalue < 1e-6


def test_apply_returns_distinct_slots_and_last_writer_wins():
    ledger = SmallLedger(2, [2], 0)
    res = LocalReservoir(2, seed=0)
    labels = [0] * 12
    decisions = ledger.apply(torch.tensor([labels]), torch.tensor([12]), 0, 0)
    positions, slots = res.apply(labels, decisions)
    assert len(set(slots)) == len(slots) and decisions.kinds[:2] == [FREE, FREE]
    for p, s in zip(positions, slots):
        later = positions[positions.index(p) + 1:]
        assert all(slots[positions.index(q)] != s for q in later)


def test_evict_is_uniform_within_a_class_and_renumbers():
    _, res, _ = run_reservoir(30, [0] * 50 + [1] * 5, seed=0)
    assert res.class_counts() == {0: 25, 1: 5}
    keep = res.evict({0: 20})
    assert len(keep) == 10 == res.size
    assert res.class_counts() == {0: 5, 1: 5}
    assert sorted(s for v in res.slots_by_class.values() for s in v) == list(range(10))


def test_list_ledger_decides_as_the_tensor_ledger_on_one_rank():
    rng = random.Random(11)
    for seed in range(30):
        capacity = rng.choice([3, 10, 40])
        n_classes = rng.choice([2, 7, 60])
        labels = [rng.randrange(n_classes) * 1000 + 7 for _ in range(rng.randrange(50, 400))]
        per_step = rng.choice([1, 5, 16])
        single = SmallLedger(capacity, [capacity], seed)
        general = ClassLedger(capacity, [capacity], seed)
        for step, chunk in enumerate(steps(labels, per_step)):
            keys, counts = torch.tensor([chunk]), torch.tensor([len(chunk)])
            experience = step // 7
            a = single.apply(keys, counts, step, 0, experience)
            b = general.apply(keys, counts, step, 0, experience)
            assert (a.kinds, a.victims) == (b.kinds, b.victims), (seed, step)
            assert single.digest() == general.digest()
        assert single.class_counts() == general.class_counts()


def equal_ledgers(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


def test_list_ledger_reuses_its_last_deal_only_for_the_same_inputs(monkeypatch):
    """Online continual learning (a new experience every step, reviving its classes)
    re-deals the same inputs again and again: the list ledger reuses its last deal then.
    Its quotas and decisions stay those of a ledger that deals every time and of the
    tensor ledger, through class arrivals, classes below and at their targets, full
    shards and a budget change."""
    from avalanche_distributed_rehearsal.core import small_ledger
    dealt = []
    real = small_ledger.deal_lists

    def counting(*args, **kwargs):
        dealt.append(1)
        return real(*args, **kwargs)

    class DealsEveryTime(SmallLedger):
        def _deal_lists(self, ub, weights, targets, rank):
            return real(self.capacities, ub, weights, targets, rank, current=self.quota_lists)

    monkeypatch.setattr(small_ledger, "deal_lists", counting)
    rng = random.Random(7)
    redeals = 0
    for case in range(12):
        world = rng.randint(1, 4)
        budget = rng.choice([world * 3, 24, 40, 200])  # 200: classes long below their targets
        caps = [budget // world + (w < budget % world) for w in range(world)]
        ledgers = [SmallLedger(budget, caps, case), DealsEveryTime(budget, caps, case),
                   ClassLedger(budget, caps, case)]
        deals_before = ledgers[0].deals
        # each rank sees its own classes of each 20-step segment, mostly as many per step
        owned = [rng.sample([0, 1], rng.randint(1, 2)) for _ in range(world)]
        usual = [rng.randint(0, 4) for _ in range(world)]
        for step in range(80):
            counts = torch.tensor([rng.randint(0, 4) if rng.random() < 0.1 else usual[w]
                                   for w in range(world)])
            keys = torch.full((world, 4), -1, dtype=torch.int64)
            for w in range(world):
                for i in range(int(counts[w])):
                    keys[w, i] = step // 20 * 2 + owned[w][i % len(owned[w])]
            rank = rng.randrange(world)
            decided = [ledger.apply(keys, counts, step, rank, experience=step)
                       for ledger in ledgers]
            assert all((d.kinds, d.victims) == (decided[0].kinds, decided[0].victims)
                       for d in decided), (case, step)
            quotas = [[ledger.quotas(w) for w in range(world)] for ledger in ledgers]
            assert quotas[0] == quotas[1] == quotas[2], (case, step)
            if step == 50:
                grown = budget + world
                caps = [grown // world + (w < grown % world) for w in range(world)]
                fits = [ledger.resize(grown, caps) for ledger in ledgers]
                assert fits[0] == fits[1] == fits[2]
        equal_ledgers(ledgers[0], ledgers[2])
        redeals += ledgers[0].deals - deals_before
    assert len(dealt) < 0.8 * redeals, (redeals, len(dealt))  # the memo served many deals


def test_list_ledger_deals_anew_when_any_input_of_the_deal_changes():
    """The reused deal is keyed on every input of the deal: the capacities and the
    current quotas (its tie-breaks) as much as the bounds, weights and targets."""
    from avalanche_distributed_rehearsal.core.deal_lists import deal as deal_lists
    rng = random.Random(11)
    differed = {"capacities": 0, "current": 0}
    for case in range(300):
        world, k = rng.randint(1, 3), rng.randint(1, 4)
        ledger = SmallLedger(12, [4] * world, case)
        ub = [[rng.choice([0, 2, 5, UNBOUNDED]) for _ in range(k)] for _ in range(world)]
        weights = [[rng.randint(0, 5) for _ in range(k)] for _ in range(world)]
        targets = [rng.randint(0, 6) for _ in range(k)]
        rank = rng.sample(range(k), k)
        for change in ("capacities", "current"):
            ledger.capacities = [rng.randint(1, 6) for _ in range(world)]
            ledger.quota_lists = [[rng.randint(0, 4) for _ in range(k)] for _ in range(world)]
            first = ledger._deal_lists(ub, weights, targets, rank)
            if change == "capacities":
                ledger.capacities = [c + rng.randint(-1, 2) for c in ledger.capacities]
            else:
                ledger.quota_lists = [[rng.randint(0, 4) for _ in range(k)]
                                      for _ in range(world)]
            expected = deal_lists(ledger.capacities, ub, weights, targets, rank,
                                  current=ledger.quota_lists)
            assert ledger._deal_lists(ub, weights, targets, rank) == expected, (case, change)
            differed[change] += expected != first
    assert min(differed.values()) > 0, differed  # each change mattered in some cases


def test_list_ledger_decides_as_the_tensor_ledger_on_many_ranks():
    """Random worlds of 1-8 ranks, random class-to-rank streams, experience changes,
    budgets above and below the classes, a resize and a state round trip midway: every
    rank's decisions, the counts, the quotas and the whole state agree at every step."""
    rng = random.Random(23)
    for case in range(40):
        world = rng.randint(1, 8)
        budget = rng.choice([world * 2, 30, 120])
        n_classes = rng.choice([3, 12, 80])
        caps = [budget // world + (w < budget % world) for w in range(world)]
        small, tensor = SmallLedger(budget, caps, case), ClassLedger(budget, caps, case)
        for step in range(rng.randint(10, 60)):
            experience = step // rng.choice([5, 9, 100])
            width = rng.choice([0, 1, 4, 9])
            counts = torch.tensor([rng.randint(0, width) for _ in range(world)])
            keys = torch.full((world, max(width, 1)), -1, dtype=torch.int64)
            for w in range(world):
                for i in range(int(counts[w])):
                    keys[w, i] = rng.randrange(n_classes) * 3 + (experience % 2)
            rank = rng.randrange(world)
            a = small.apply(keys, counts, step, rank, experience)
            b = tensor.apply(keys, counts, step, rank, experience)
            assert (a.kinds, a.victims) == (b.kinds, b.victims), (case, step)
            assert small.digest() == tensor.digest()
            assert small.quotas(rank) == tensor.quotas(rank)
            assert torch.equal(small.eligible_per_rank([3, 4]), tensor.eligible_per_rank([3, 4]))
            if step == 7:
                grown = budget + rng.choice([-world, world * 3])
                caps = [grown // world + (w < grown % world) for w in range(world)]
                assert small.resize(grown, caps) == tensor.resize(grown, caps)
            if step == 11:
                copy = SmallLedger(small.budget, small.capacities, case)
                copy.load_state_dict(tensor.state_dict())
                equal_ledgers(copy, small)
                small = copy
        equal_ledgers(small, tensor)
        assert small.class_counts() == tensor.class_counts()
