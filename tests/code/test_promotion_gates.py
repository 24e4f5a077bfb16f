from tasks.params import PromoteParams
from tasks.stages.promote import decide

GOOD = {"high_risk_roc_auc": 0.88, "balanced_accuracy": 0.80, "high_risk_recall": 0.92, "ece": 0.05}
PARAMS = PromoteParams(
    min_high_risk_auc=0.7,
    max_high_risk_auc_drop=0.01,
    max_balanced_accuracy_drop=0.01,
    min_high_risk_recall=0.85,
    max_ece=0.15,
    min_balanced_accuracy=0.4,
)


def test_first_model_needs_only_the_absolute_floors():
    promoted, reasons = decide(GOOD, None, PARAMS)
    assert promoted and len(reasons) == 4 and all(r.startswith("pass") for r in reasons)


def test_each_gate_can_block_on_its_own():
    for change, word in (
        ({"high_risk_recall": 0.80}, "high-risk recall"),
        ({"ece": 0.20}, "calibration"),
        ({"balanced_accuracy": 0.35}, "floor 0.400"),
        ({"high_risk_roc_auc": 0.65}, "ROC-AUC 0.650 vs floor 0.700"),
    ):
        promoted, reasons = decide({**GOOD, **change}, None, PARAMS)
        assert not promoted
        failed = [r for r in reasons if r.startswith("FAIL")]
        assert len(failed) == 1 and word in failed[0]


def test_a_drop_beyond_the_tolerance_against_the_champion_blocks():
    champion = {**GOOD, "balanced_accuracy": 0.82}
    assert decide({**GOOD, "balanced_accuracy": 0.812}, champion, PARAMS)[0]  # within 0.01
    promoted, reasons = decide({**GOOD, "balanced_accuracy": 0.80}, champion, PARAMS)
    assert not promoted and "champion 0.820" in reasons[-1] and reasons[-1].startswith("FAIL")


def test_a_high_risk_auc_drop_against_the_champion_blocks_even_with_better_accuracy():
    champion = {**GOOD, "high_risk_roc_auc": 0.90}
    promoted, reasons = decide({**GOOD, "balanced_accuracy": 0.85}, champion, PARAMS)
    failed = [r for r in reasons if r.startswith("FAIL")]
    assert not promoted and len(failed) == 1 and "champion 0.900" in failed[0]
