# Helpers shared by the cluster launchers (sourced; bash 3.2 compatible, so macOS laptops work).

quote() {  # shell-quotes each argument for copy-paste, leaving plain words bare
  local out="" a sq="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then out+="$a "
    else out+="'${a//$sq/$sq\\$sq$sq}' "; fi
  done
  printf '%s' "${out% }"
}

run_or_print() {  # runs a command, or prints it as "+ <quoted command>" when DRY_RUN=1
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $(quote "$@")"; else "$@"; fi
}
