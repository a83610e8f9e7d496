# Generic option parsing for run.sh, in the manner of Kaldi's utils/parse_options.sh:
# every variable the caller has set before sourcing this file can be given as --name value
# (dashes in the option name stand for underscores). Unknown options are an error.
# The caller defines $help_message; --help prints it.
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      printf '%s\n' "$help_message"
      exit 0 ;;
    --*=*)
      _opt=${1%%=*}; _val=${1#*=}; shift ;;
    --*)
      _opt=$1
      if [ $# -lt 2 ]; then echo "$0: option $_opt needs a value" >&2; exit 1; fi
      _val=$2; shift 2 ;;
    *)
      echo "$0: unexpected argument '$1' (options look like --name value; see --help)" >&2
      exit 1 ;;
  esac
  _name=${_opt#--}; _name=${_name//-/_}
  if [ -z "${!_name+x}" ] || [[ ! "$_name" =~ ^[a-z][a-z0-9_]*$ ]]; then
    echo "$0: unknown option $_opt (see --help)" >&2
    exit 1
  fi
  printf -v "$_name" '%s' "$_val"
done
unset _opt _val _name
