"""Every number dori quotes from the paper (Kowalczuk et al., arXiv 2507.16880 v3 / ICML 2026, SD v1.4).

Settings of the methods (Dori's optimiser, NeMo's and Wanda's defaults) live in their configs and
cite the paper's sections there; this module holds the *results* dori compares against and the
sizes of the paper's experiments.
"""

#: Replication: SSCD similarity to the training image above this (section 2.5).
SSCD_THRESHOLD = 0.7

#: Table 1 (v3, SD v1.4, verbatim-memorized prompts): memorization rate per setting.
TABLE1_MR = {"memorized": 0.98, "non-memorized": 0.00, "non-memorized+dori": 0.00, "nemo": 0.20, "nemo+dori": 0.99,
             "wanda": 0.00, "wanda+dori": 0.72}

#: Table 2 (v3, SD v1.4): memorization rate under Dori after each fine-tuning mitigation.
TABLE2_MR = {"adversarial-ft+dori": 0.02, "esd+dori": 0.98, "ca+dori": 0.97, "siss+dori": 0.39, "wanda-10+dori": 0.01}

#: Table 2 (v3): the damage Wanda at 10% sparsity does to the memorized captions' concepts (A_Concept, an
#: accuracy on semantically related "concept" prompts, drops to 0.33; FID_Concept 80.70).
CONCEPT_DAMAGE = {"wanda-10": {"a_concept": 0.33, "fid_concept": 80.70}}

#: MR after 0, 1, 10, 25 and 50 Dori steps (v3 figure "Memorization Rate vs Optimization Steps").
MR_VS_STEPS = {
    "nemo+dori": {0: 0.20, 1: 0.73, 10: 0.79, 25: 0.94, 50: 0.99},
    "wanda+dori": {0: 0.00, 1: 0.02, 10: 0.18, 25: 0.49, 50: 0.73},
    "non-memorized+dori": {0: 0.00, 1: 0.00, 10: 0.00, 25: 0.00, 50: 0.02},
}

#: Sizes of the locality analyses (section 2.2-2.4): random starts of one image, Dori steps each,
#: and different memorized prompts in Y_mem.
STARTS = 100
STEPS = 50
MEMORIZED = 100


def paper_mr(row: str) -> float | None:
    """The paper's MR for a Table 1 / Table 2 row name, or None when the paper has no such row."""
    return {**TABLE1_MR, **TABLE2_MR}.get(row)
