#!/usr/bin/env bash
# The GPU runs behind eval/results/*.json, as they were run (calls of at most 10 minutes on one GPU). Each results
# file names the commit it ran at: the jobs have moved on since (jobs/causal_tiny_sf.toml took the regression term
# and context noise 0.2 after causal_long; the causal, causal_sf and causal_reg runs were without them).
# The students of the current teacher (phase 7), on one H200:
#   jobs/gpu_results.sh students   # 7 method jobs side by side (5.8 minutes of training each)
#   jobs/gpu_results.sh evaluate   # methods_tiny (all 7) and dmd_tiny (512 prompts each)
#   jobs/gpu_results.sh one_step   # two longer 1-step DMD runs appended to methods_tiny
#   jobs/gpu_results.sh causal     # causal DMD (diffusion forcing, self-forcing with 48-frame rollouts and without)
#                                  # side by side from the regression student; causal_tiny_ablation
#   jobs/gpu_results.sh causal_sf  # the self-forcing student alone (48-frame rollouts); causal_tiny
#   jobs/gpu_results.sh causal_reg # causal DMD with its regression term on ODE pairs; causal_tiny_regression
#   jobs/gpu_results.sh causal_noise # self-forcing with the regression term, context noise 0 / 0.1 / 0.2; causal_tiny_noise
#   jobs/gpu_results.sh causal_long  # causal_noise's 0.2 student trained on at context noise 0.2 and 0.3; causal_tiny_long
#   jobs/gpu_results.sh causal_ode # on one H100, each job alone: a regression student on 2048 ODE pairs, self-forcing
#                                  # from it at context noise 0.2, then on at 0.3; causal_tiny_ode
#   jobs/gpu_results.sh causal_cap; jobs/gpu_results.sh causal_cap_eval  # self-forcing at 0.3 (the job's level since)
#                                  # with and without capped noise levels on later windows; causal_tiny_cap
#   jobs/gpu_results.sh causal_reencode; jobs/gpu_results.sh causal_reencode_eval  # self-forcing through re-encoded
#                                  # windows: four variants side by side; causal_tiny_reencode_sf
#   MIN=6.3 jobs/gpu_results.sh causal_lr  # then one-clip rollouts at higher learning rates; causal_tiny_reencode_lr
#   (bench rows with restarts: python eval/bench_streaming.py --ends-only --compile --reencode-frames 0 3
#    --out eval/results/streaming_reencode_h100.json)
#   TEACHER_MIN=6.5 NUM=256 jobs/gpu_results.sh long_teacher_on  # after causal_long_teacher: its teacher trained on;
#                                  # tiny_teacher_long_on_windows, then a second round (see the case); on one H100
# Planned, not run yet (the device time left after the teacher's rounds did not cover them):
#   MIN=3.6 MIN80=3.8 jobs/gpu_results.sh causal_long_sf; NUM=256 jobs/gpu_results.sh causal_long_sf_eval
#                                  # self-forcing against that teacher, one clip and then 80-frame rollouts
# (eval/results/causal_tiny_reencode.json ran on the CPU from causal_cap's `sf` student, brought back from the GPU: the
#  command is in the file.)
# Earlier students (lora_tiny, sparse_tiny) came from the phase-5 teacher: `lora_sparse` retrains them.
# Benchmarks and the teacher:
#   jobs/gpu_results.sh bench      # attention (480p, and the Triton sweep), memory and streaming on one H100, each alone
#   jobs/gpu_results.sh h200       # the Triton sweep, attention at 480p and 720p (20% density), compiled streaming
#   jobs/gpu_results.sh teacher    # the teacher's phases 6-7 (coordinate channels) and its evaluation (two calls)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=runs/methods; C=runs/causal_tiny; MIN=${MIN:-5.8}; NUM=${NUM:-512}
mkdir -p $R/logs
ode_pairs() {  # N [BATCH]: the teacher's ODE pairs for the causal students' regression, unless N of them exist (each
              # batch's noise is seeded by its first index, so the batch size is part of the data)
  if [ -f $C/pairs/index.json ]; then
    python -c "import json, sys; n = json.load(open('$C/pairs/index.json'))['num_samples']; \
      sys.exit(0 if n == $1 else '$C/pairs holds %d ODE pairs, this case wants $1: move them aside' % n)"
  else
    python -m distill.cli ode-pairs --teacher tiny --out $C/pairs --num $1 --student-steps 4 --teacher-steps 48 \
      --guidance 4 --dtype float16 --batch-size ${2:-128} > $R/logs/pairs.log 2>&1
  fi
}
causal_init() {  # the regression student of jobs/causal_tiny_ode.toml on 2048 ODE pairs, unless it exists
  ode_pairs 2048 256
  [ -d $C/ode/model ] || python -m distill.cli train jobs/causal_tiny_ode.toml --set train.checkpoint_every=100000 \
    > $R/logs/ode.log 2>&1
}
train() {  # NAME JOB [--set ...]: one job in the background, stopped by train.max_minutes
  local name=$1 job=$2; shift 2
  python -m distill.cli train "$job" --set "output.dir='$R/$name'" --set train.steps=100000 \
    --set train.max_minutes=$MIN --set train.checkpoint_every=100000 "$@" > $R/logs/$name.log 2>&1 &
}
case "${1:-}" in
  students)
    for s in 1 4; do train dmd_s$s jobs/tiny_dmd.toml --set method.student_steps=$s; done
    train dmd_gan_s1 jobs/tiny_dmd_gan.toml --set method.student_steps=1
    for s in 1 2 4; do train cd_s$s jobs/tiny_cd.toml --set method.student_steps=$s; done
    train cd_gan_s1 jobs/tiny_cd_gan.toml --set method.student_steps=1
    wait ;;
  one_step)  # two longer 1-step DMD runs, added to methods_tiny (ran beside `causal`)
    MIN=7.3
    train dmd_s1_long jobs/tiny_dmd.toml --set method.student_steps=1
    train dmd_s1_lr5e-5 jobs/tiny_dmd.toml --set method.student_steps=1 --set optim.lr=5e-5
    wait
    python -m eval.compare_methods $R/dmd_s1_long/model $R/dmd_s1_lr5e-5/model --steps 1 --teacher-steps 0 --append \
      --num $NUM --device cuda --out eval/results/methods_tiny.json ;;
  lora_sparse)
    train lora jobs/lora_tiny_dmd.toml --set data.batch_size=32 --set data.pool=8192 --set train.ema_decay=0.99
    train sparse jobs/sparse_tiny_dmd.toml --set data.batch_size=32 --set data.pool=8192 --set train.ema_decay=0.99
    wait
    E=(--num $NUM --device cuda)
    python -m distill.cli eval --teacher tiny --steps 50 --student $R/lora/model --student-name lora \
      --also-student full=$R/dmd_s4/model --student-steps 4 2 1 "${E[@]}" --out eval/results/lora_tiny.json
    python -m eval.compare_students --student sparse=$R/sparse/model --student dense=$R/dmd_s4/model \
      --student-steps 4 2 1 "${E[@]}" --out eval/results/sparse_tiny.json ;;
  evaluate)
    E=(--num $NUM --device cuda)
    python -m distill.cli eval --teacher tiny --student $R/dmd_s4/model --steps 50 4 2 1 --student-steps 4 2 1 "${E[@]}" \
      --out eval/results/dmd_tiny.json --grid eval/results/dmd_tiny_grid.npy --scale 1 > $R/logs/eval_dmd.log 2>&1 &
    python -m eval.compare_methods $R/{cd,cd_gan,dmd,dmd_gan}_s*/model "${E[@]}" --out eval/results/methods_tiny.json \
      > $R/logs/eval_methods.log 2>&1 &
    wait ;;
  causal)  # MIN=6.0 NUM=256 TEACHER_STEPS=0: causal DMD side by side from the regression student (ODE pairs and
           # regression first if absent): diffusion forcing, self-forcing with 48-frame rollouts and plain self-forcing
    ode_pairs 512
    if [ ! -d $C/ode/model ]; then
      python -m distill.cli train jobs/causal_tiny_ode.toml --set train.max_minutes=2.0 > $R/logs/ode.log 2>&1
    fi
    T=(--set train.max_minutes=$MIN --set train.checkpoint_every=100000)
    python -m distill.cli train jobs/causal_tiny_df.toml "${T[@]}" > $R/logs/causal_df.log 2>&1 &
    python -m distill.cli train jobs/causal_tiny_sf.toml "${T[@]}" > $R/logs/causal_sf.log 2>&1 &
    python -m distill.cli train jobs/causal_tiny_sf.toml "${T[@]}" --set student.rollout_frames=16 \
      --set "output.dir='$C/sf_clip'" > $R/logs/causal_sf_clip.log 2>&1 &  # plain Self-Forcing, for comparison
    wait
    python -m eval.windows --teacher tiny --teacher-steps ${TEACHER_STEPS:-50} --causal dmd_sf=$C/sf/model \
      --causal dmd_sf_clip=$C/sf_clip/model --causal dmd_df=$C/df/model --windows 0 1 4 --num $NUM --device cuda \
      --out eval/results/causal_tiny_ablation.json ;;
  causal_reg)  # MIN=5.0 NUM=256: causal DMD with DMD's regression term on teacher ODE pairs, its guard against the
               # shapes slowing down (eval.windows shape_speed), side by side; causal_tiny_regression
    ode_pairs 1024
    T=(--set "data.kind='ode_pairs'" --set "data.path='$C/pairs'" --set train.max_minutes=$MIN
       --set train.checkpoint_every=100000)
    for w in 0.25 1.0; do
      python -m distill.cli train jobs/causal_tiny_sf.toml "${T[@]}" --set "method.weights={regression=$w}" \
        --set "output.dir='$C/sf_reg$w'" > $R/logs/causal_sf_reg$w.log 2>&1 &
    done
    python -m distill.cli train jobs/causal_tiny_df.toml "${T[@]}" --set "method.weights={regression=0.25}" \
      --set "output.dir='$C/df_reg0.25'" > $R/logs/causal_df_reg0.25.log 2>&1 &
    wait
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal sf_reg0.25=$C/sf_reg0.25/model \
      --causal sf_reg1=$C/sf_reg1.0/model --causal df_reg0.25=$C/df_reg0.25/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_regression.json ;;
  causal_noise)  # MIN=5.0 NUM=256: self-forcing with the regression term (weight 1), finished chunks written to the
                 # KV cache re-noised to student.context_noise 0 / 0.1 / 0.2, side by side; causal_tiny_noise (ran
                 # at 68d6e0d with the term and the pairs set on the command line, as the job file now has them)
    ode_pairs 1024
    for n in 0.0 0.1 0.2; do
      python -m distill.cli train jobs/causal_tiny_sf.toml --set train.max_minutes=$MIN --set train.checkpoint_every=100000 \
        --set student.context_noise=$n --set "output.dir='$C/sf_cn$n'" > $R/logs/causal_sf_cn$n.log 2>&1 &
    done
    wait
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal cn0=$C/sf_cn0.0/model --causal cn0.1=$C/sf_cn0.1/model \
      --causal cn0.2=$C/sf_cn0.2/model --windows 0 1 4 --num $NUM --device cuda --out eval/results/causal_tiny_noise.json ;;
  causal_long)  # MIN=5.8 NUM=256: causal_noise's context-noise-0.2 student trained on (a fresh critic), at context noise
                # 0.2 and 0.3 side by side; causal_tiny_long
    ode_pairs 1024
    for n in 0.2 0.3; do
      python -m distill.cli train jobs/causal_tiny_sf.toml --set train.max_minutes=$MIN --set train.checkpoint_every=100000 \
        --set "student.init='$C/sf_cn0.2/model'" --set student.context_noise=$n --set "output.dir='$C/sf_cn${n}_long'" \
        > $R/logs/causal_sf_cn${n}_long.log 2>&1 &
    done
    wait
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal cn0.2=$C/sf_cn0.2/model \
      --causal cn0.2_long=$C/sf_cn0.2_long/model --causal cn0.3_long=$C/sf_cn0.3_long/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_long.json ;;
  causal_ode)  # NUM=256: the regression student on 4x the pairs at twice the batch for twice as long, self-forcing from
               # it (context noise 0.2, 3.5 min), then on at 0.3 (4.3 min, a fresh critic); causal_tiny_ode (its
               # regression rows came from a separate run of the same evaluation on that student alone)
    causal_init
    S=(--set train.steps=100000 --set train.checkpoint_every=100000)
    python -m distill.cli train jobs/causal_tiny_sf.toml "${S[@]}" --set train.max_minutes=3.5 > $R/logs/causal_sf.log 2>&1
    python -m distill.cli train jobs/causal_tiny_sf.toml "${S[@]}" --set train.max_minutes=4.3 \
      --set "student.init='$C/sf/model'" --set student.context_noise=0.3 --set "output.dir='$C/sf_long'" \
      > $R/logs/causal_sf_long.log 2>&1
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal sf_ode2048=$C/sf/model \
      --causal sf_ode2048_long=$C/sf_long/model --causal regression=$C/ode/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_ode.json ;;
  causal_init) causal_init ;;
  causal_cap)  # MIN=4.8, on one H100 beside `pytest -m gpu`: from causal_init's student, three self-forcing students
               # side by side at context noise 0.3: the job as is, later windows scored at DMD noise levels <= 0.5, and
               # that with rollouts five clips long (they reach window 4); causal_tiny_cap. Ran at 373c3cc: the option
               # (student.later_window_t_max) lost to the job as is and was removed after.
    causal_init
    train sf jobs/causal_tiny_sf.toml
    train sf_cap0.5 jobs/causal_tiny_sf.toml --set student.later_window_t_max=0.5
    train sf_cap0.5_r80 jobs/causal_tiny_sf.toml --set student.later_window_t_max=0.5 --set student.rollout_frames=80
    wait ;;
  causal_cap_eval)  # NUM=256
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal sf=$R/sf/model --causal sf_cap0.5=$R/sf_cap0.5/model \
      --causal sf_cap0.5_r80=$R/sf_cap0.5_r80/model --causal regression=$C/ode/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_cap.json ;;
  causal_reencode)  # MIN=4.6, on one H100 after causal_init: four self-forcing students side by side, all rolling out
                    # through re-encoded windows (the job's reencode_frames = 4): the job as is (48-frame rollouts),
                    # one-clip rollouts (a restarted window is a clip's opening, so these see its cases, at 3x the
                    # steps), those without the regression term, and those at 2.5x the learning rate
    causal_init
    train re48 jobs/causal_tiny_sf.toml
    train re16 jobs/causal_tiny_sf.toml --set student.rollout_frames=16
    train re16_noreg jobs/causal_tiny_sf.toml --set student.rollout_frames=16 --set "method.weights={dmd=1.0}"
    train re16_lr5e-5 jobs/causal_tiny_sf.toml --set student.rollout_frames=16 --set optim.lr=5e-5
    wait ;;
  causal_reencode_eval)  # NUM=256
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal re48=$R/re48/model --causal re16=$R/re16/model \
      --causal re16_noreg=$R/re16_noreg/model --causal re16_lr5e-5=$R/re16_lr5e-5/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_reencode_sf.json ;;
  causal_lr)  # MIN=6.3 NUM=256, right after causal_reencode on the same machine (from causal_init's student): one-clip
              # rollouts at 2.5x and 5x the learning rate, and 48-frame rollouts at 2.5x, side by side, then evaluated;
              # causal_tiny_reencode_lr (the first became the job's setting)
    causal_init
    train r16_lr5e-5 jobs/causal_tiny_sf.toml --set student.rollout_frames=16 --set optim.lr=5e-5
    train r16_lr1e-4 jobs/causal_tiny_sf.toml --set student.rollout_frames=16 --set optim.lr=1e-4
    train r48_lr5e-5 jobs/causal_tiny_sf.toml --set student.rollout_frames=48 --set optim.lr=5e-5
    wait
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal r16_lr5e-5=$R/r16_lr5e-5/model \
      --causal r16_lr1e-4=$R/r16_lr1e-4/model --causal r48_lr5e-5=$R/r48_lr5e-5/model --windows 0 1 4 --num $NUM \
      --device cuda --out eval/results/causal_tiny_reencode_lr.json ;;
  causal_long_teacher)  # MIN=3.5 NUM=256, on one warm machine as it ran (three calls): the teacher of long-video
                        # windows beside causal_init; the one-clip self-forcing student (3.5 min) beside the new
                        # teacher's windows; from that student, 48-frame self-forcing rollouts scored by the new
                        # teacher and by the shipped one (the control), side by side; causal_tiny_long_teacher
    python -m distill.cli train jobs/tiny_teacher_long.toml > $R/logs/teacher_long.log 2>&1 &
    causal_init; wait
    python -m eval.windows --teacher $C/teacher_long/model --windows 0 1 4 --num $NUM --device cuda \
      --out eval/results/tiny_teacher_long_windows.json > $R/logs/teacher_long_eval.log 2>&1 &
    python -m distill.cli train jobs/causal_tiny_sf.toml --set train.checkpoint_every=100000 \
      --set train.max_minutes=$MIN > $R/logs/sf.log 2>&1
    wait
    FROM_SF=(--set "student.init='$C/sf/model'" --set student.rollout_frames=48)
    train long48 jobs/causal_tiny_sf.toml "${FROM_SF[@]}" --set "model.family='wan'" \
      --set "model.source='$C/teacher_long/model'"
    train plain48 jobs/causal_tiny_sf.toml "${FROM_SF[@]}"
    wait
    python -m eval.windows --teacher tiny --teacher-steps 0 --causal sf=$C/sf/model --causal long48=$R/long48/model \
      --causal plain48=$R/plain48/model --windows 0 1 4 --num $NUM --device cuda \
      --out eval/results/causal_tiny_long_teacher.json ;;
  long_teacher_on)  # TEACHER_MIN=6.5 NUM=256, alone on one H100: causal_long_teacher's teacher (5 min) trained on
                    # with a fresh optimiser from its bf16 export, and its windows; tiny_teacher_long_on_windows.
                    # Ran at b30ee4a, then once more on the same machine: `mv $C/teacher_long_on $C/teacher_long`,
                    # TEACHER_MIN=5.6, its file moved to tiny_teacher_long_on2_windows
    python -m distill.cli train jobs/tiny_teacher_long.toml --set "model.family='wan'" \
      --set "model.source='$C/teacher_long/model'" --set "output.dir='$C/teacher_long_on'" \
      --set train.max_minutes=${TEACHER_MIN:-6.5} > $R/logs/teacher_long_on.log 2>&1
    python -m eval.windows --teacher $C/teacher_long_on/model --windows 0 1 4 --num $NUM --device cuda \
      --out eval/results/tiny_teacher_long_on_windows.json ;;
  causal_long_sf)  # MIN=3.6 MIN80=3.8 (not run yet), after long_teacher_on on the same machine: from causal_init's
                   # student, one-clip self-forcing with that teacher as the real score (the critic, copied from it,
                   # reads clip offsets too), kept as sf_long_clip; then the same run resumed (critic and optimisers
                   # carry over) with 80-frame rollouts of 16 prompts, whose windows 0-4 the teacher scores at their
                   # offsets
    causal_init
    LONG=(--set "model.family='wan'" --set "model.source='$C/teacher_long_on/model'")
    train sf_long jobs/causal_tiny_sf.toml "${LONG[@]}"; wait
    rm -rf $R/sf_long_clip; cp -r $R/sf_long/model $R/sf_long_clip
    train sf_long jobs/causal_tiny_sf.toml "${LONG[@]}" --set output.resume=true --set student.rollout_frames=80 \
      --set data.batch_size=16 --set train.max_minutes=${MIN80:-3.8}; wait ;;
  causal_long_sf_eval)  # NUM=256: long_teacher_on's teacher and causal_long_sf's students on windows 0, 1, 4
    python -m eval.windows --teacher $C/teacher_long_on/model --causal one_clip=$R/sf_long_clip \
      --causal rollout80=$R/sf_long/model --windows 0 1 4 --num $NUM --device cuda \
      --out eval/results/causal_tiny_long_sf.json ;;
  causal_sf)  # MIN=7.0 NUM=256: the self-forcing student (48-frame rollouts) alone on the GPU, then causal_tiny
    ode_pairs 1024
    python -m distill.cli train jobs/causal_tiny_sf.toml --set train.max_minutes=$MIN \
      --set train.checkpoint_every=100000 > $R/logs/causal_sf.log 2>&1
    python -m eval.windows --teacher tiny --bidirectional $R/dmd_s4/model --causal dmd_sf=$C/sf/model \
      --windows 0 1 4 --num $NUM --device cuda --out eval/results/causal_tiny.json ;;
  bench)
    python eval/bench_attention.py --shapes 480p --densities 0.2
    python eval/bench_attention.py --sweep --out eval/results/attention_sweep_h100.json
    python eval/bench_memory.py
    python eval/bench_streaming.py ;;
  h200)
    python eval/bench_attention.py --sweep  # then DEFAULT in distill/attention/triton_kernel.py = its 'chosen' row
    python eval/bench_attention.py --shapes 480p --densities 0.2 --out eval/results/attention_h200.json
    python eval/bench_attention.py --shapes 720p --densities 0.2 --iters 5 --out eval/results/attention_h200.json --append
    # its compiled row was appended to eval/results/streaming_h200.json (eager rows: --ends-only --no-compile --chunks 8)
    python eval/bench_streaming.py --ends-only --compile --chunks 8 --out runs/streaming_compiled.json ;;
  teacher)
    # phase 6 starts from the phase-5 teacher: teachers/tiny as it was at commit a31b9f2 (before these channels)
    T=(--set "model.config={}" --set optim.warmup_steps=100 --set schedule.shift=3.0 --set train.steps=30000
       --set "schedule.time_distribution='uniform'" --set train.checkpoint_every=100000)
    python -m distill.cli train jobs/tiny_teacher.toml "${T[@]}" --set "model.source='teachers/tiny'" \
      --set optim.lr=3e-4 --set train.max_minutes=5.5 --set "output.dir='runs/teacher_pos'"
    python -m distill.cli train jobs/tiny_teacher.toml "${T[@]}" --set "model.source='runs/teacher_pos/model'" \
      --set optim.lr=2e-4 --set train.max_minutes=5.0 --set "output.dir='runs/teacher_pos2'"
    python -m eval.prompt_sensitivity --teacher runs/teacher_pos2/model --device cuda --num 32
    python -m distill.cli eval --teacher runs/teacher_pos2/model --steps 50 4 2 1 --num 512 --device cuda \
      --out runs/teacher_pos2_eval.json ;;  # its rows are in eval/results/tiny_teacher.json
  *) echo "usage: $0 students|evaluate|one_step|causal|causal_sf|causal_reg|causal_noise|causal_long|causal_ode|causal_init|causal_cap|causal_cap_eval|causal_reencode|causal_reencode_eval|causal_lr|causal_long_teacher|lora_sparse|bench|h200|teacher" >&2; exit 2 ;;
esac
