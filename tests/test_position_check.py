"""The position-channel check runs end to end and reports both models' change and the ideal one."""

from eval.position_check import main


def test_position_check_reports_both_models():
    results = main(["--steps", "2", "--pairs", "1"])
    assert {name for name, _ in results} == {"rope-only", "coordinates"}
    assert all(ideal > 0 and got >= 0 for got, ideal in results.values())
