"""tasks/finetune.py and run_finetune.py: each task's command line has its own mode flags; the four
tasks are specs of one driver."""
from __future__ import annotations

import pytest

import run_finetune
from tasks.spec import mode_flags
from tasks.spec import TaskSpec


def test_each_task_has_its_own_mode_flags():
    flags = {t: set(mode_flags(run_finetune.task_spec(t))) for t in run_finetune.TASKS}
    own = {"retrieval": {"--zero-shot", "--predict", "--text", "--top-k"}, "vqa": {"--predict", "--question", "--open-ended"},
           "nlvr2": {"--predict", "--text"}, "snli_ve": {"--predict", "--text"}, "caption": {"--predict"}}
    for task, got in flags.items():
        assert got == {"--evaluate"} | own[run_finetune.task_spec(task).name], task
    args = run_finetune.parse_args(["--task", "caption_shapes", "--predict", "a.png", "b.png"])
    assert args.predict == ["a.png", "b.png"] and not hasattr(args, "zero_shot") and not hasattr(args, "question")
    assert run_finetune.parse_args(["--task", "retrieval_coco", "--zero-shot"]).zero_shot is True
    for argv in (["--task", "vqa", "--zero-shot"], ["--task", "caption_shapes", "--text", "a"],
                 ["--task", "nlvr2", "--question", "x"]):
        with pytest.raises(run_finetune.UsageError, match="unrecognized arguments"):
            run_finetune.parse_args(argv)


def test_a_flag_the_task_does_not_have_is_one_line(capsys):
    assert run_finetune.main(["--task", "vqa_shapes", "--zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--zero-shot" in err and "--help" in err
    assert run_finetune.main(["--task", "nowhere"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_task_module_is_a_spec_of_the_driver():
    specs = {run_finetune.task_spec(t) for t in run_finetune.TASKS}
    assert all(isinstance(s, TaskSpec) for s in specs)
    assert {s.name for s in specs} == {"retrieval", "vqa", "nlvr2", "snli_ve", "caption"}
    from tasks.resume import TASK_EXTRA  # every task has its resume allow-list under its name
    assert {s.name for s in specs} <= set(TASK_EXTRA)
