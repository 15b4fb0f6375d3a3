# The handler: the event (JSON) is $1; what it prints on stdout is the
# response; stderr goes to the function's log.
# curl localhost:8080/function/hello-sh?name=you
handler () {
  NAME="$(printf '%s' "$1" | sed -n 's/.*"name": *"\([^"]*\)".*/\1/p' | tr -cd 'A-Za-z0-9 _-')"
  echo "saying hello to ${NAME:=world}" >&2
  printf '{"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "Hello, %s!\\n"}' "$NAME"
}
