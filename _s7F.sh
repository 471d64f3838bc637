# session 7, call F: greedy m=2 and beam 4 at b7b4860 (first turns on graphed prefill shapes)
rm -rf /tmp/site; source .fi-cache/s5call1.sh || exit 1
git log --oneline -1 2>/dev/null | cut -c1-60
timeout 555 python3 benchmarks/gpu_streams.py --out $OUT/gs_m2_beam4 --settings greedy_m2,beam4_m2 --start greedy_m2=255,beam4_m2=90 --static-start greedy_m2=90,beam4_m2=40 --budget 430 --static-share 0.2 --skip-parts --seconds 60 --batch-timeout 0.05 --time-limit 470 2>&1 | grep -v "it/s\]" > $OUT/gs_m2_beam4.log; grep -E "out of GPU|N=|N\*|naive" $OUT/gs_m2_beam4.log | cut -c1-330 | tail -30
