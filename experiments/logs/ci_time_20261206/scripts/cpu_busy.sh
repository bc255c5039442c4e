# The multi-process tier alone, with the machine's CPU busy share over its run:
# bash experiments/logs/ci_time_20261206/scripts/cpu_busy.sh python -m pytest -q -m multiprocess --durations=6
# Runs "$@" and prints the machine's CPU busy share over its run (from /proc/stat).
read -r _ u1 n1 s1 i1 w1 q1 sq1 st1 _ < /proc/stat
start=$(date +%s.%N)
"$@"; rc=$?
read -r _ u2 n2 s2 i2 w2 q2 sq2 st2 _ < /proc/stat
end=$(date +%s.%N)
busy=$(( (u2+n2+s2+q2+sq2+st2) - (u1+n1+s1+q1+sq1+st1) )); idle=$(( (i2+w2) - (i1+w1) ))
echo "rc $rc; wall $(echo "$end - $start" | bc) s; CPU busy $busy, idle $idle jiffies: busy share $(echo "scale=3; $busy / ($busy + $idle)" | bc)"
