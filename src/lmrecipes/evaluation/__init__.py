"""Judging generated code: HumanEval problems, a process sandbox, the pass@k estimator, generation and a callback."""
