#!/usr/bin/env bash
# community: posts each approved article once to a Discord-compatible webhook.
#
#     community.sh            (COMMUNITY_WEBHOOK_URL: where to post; by default the demo's
#                              receiver on 127.0.0.1:$WATCHKEEPER_DEMO_PORT, default 8765)
#
# Written with the `watchkeeper` CLI alone, to show the drop-in contract outside Python:
# every operation is a command, every answer an exit code (0 done, 1 error, 3 no daemon,
# 5 denied by the output gate: stop, 6 memory version conflict).
#
# Posting is at most once per article: the run first claims `community/posted-<slug>` with
# --expect-version 0 ("must not exist yet"); only the run whose claim succeeds posts. A claim
# is given back only when the post certainly did not happen (the receiver refused the
# connection), so the next run retries it; any other failure leaves the claim, because a
# duplicate post in a channel is worse than a missing one.
set -uo pipefail

webhook=${COMMUNITY_WEBHOOK_URL:-http://127.0.0.1:${WATCHKEEPER_DEMO_PORT:-8765}/webhooks/community}
say() { echo "community: $*"; }

watchkeeper heartbeat || exit 1
command -v curl >/dev/null || { say "curl is needed to post to the webhook"; exit 1; }
if ! watchkeeper upstream-ok seo; then
    say "degraded: seo is stale or failing (${WATCHKEEPER_DEGRADED_UPSTREAMS:-}); posting only what it approved before"
fi

# `memory list` prints JSON with two-space indents: each entry's key is on a line of its own.
slugs=$(watchkeeper memory list approved --json | sed -n 's/^    "key": "\([a-z0-9-]*\)",$/\1/p')
posted=0 waiting=0
for slug in $slugs; do
    if watchkeeper memory get community "posted-$slug" >/dev/null; then
        continue  # posted (or claimed) before
    fi
    waiting=$((waiting + 1))
    # A retried call with the same idempotency key replays its answer; the key names this
    # run, so a later run's claim is judged afresh and conflicts.
    claim=$(watchkeeper memory put community "posted-$slug" \
        "{\"state\": \"claimed\", \"run_id\": \"$WATCHKEEPER_RUN_ID\"}" \
        --expect-version 0 --idempotency-key "$WATCHKEEPER_RUN_ID-$slug")
    case $? in
        0) ;;
        6) say "$slug: claimed by another run; leaving it"; continue ;;
        *) say "$slug: cannot claim it"; exit 1 ;;
    esac
    # The message is stored as a JSON string, so it drops into the body as it is.
    message=$(watchkeeper memory get approved "$slug")
    printf '%s' "$message" | watchkeeper emit post "$slug" --content-file -
    rc=$?
    if [ "$rc" -ne 0 ]; then
        watchkeeper memory delete community "posted-$slug" --expect-version "$claim" >/dev/null
        [ "$rc" -eq 5 ] && say "the output gate denied posting $slug; stopping"
        exit "$rc"
    fi
    body="{\"content\": $message, \"allowed_mentions\": {\"parse\": []}}"
    curl -fsS -m 10 -H 'Content-Type: application/json' -d "$body" "$webhook" >/dev/null
    rc=$?
    if [ "$rc" -eq 7 ]; then  # could not connect: certainly not posted, retry next run
        watchkeeper memory delete community "posted-$slug" --expect-version "$claim" >/dev/null
        say "$slug: the webhook refused the connection; will retry"
        exit 1
    elif [ "$rc" -ne 0 ]; then
        watchkeeper memory merge community "posted-$slug" "{\"state\": \"uncertain\", \"curl_exit\": $rc}" >/dev/null
        say "$slug: post failed (curl exit $rc); not retried, to never post twice"
        exit 1
    fi
    watchkeeper memory merge community "posted-$slug" "{\"state\": \"posted\", \"at\": $(date +%s)}" >/dev/null
    # No text generation here: the message comes from seo. The template's size is reported so
    # the spend window sees every agent.
    watchkeeper usage --tokens $(( (${#message} + 3) / 4 )) --model template || exit $?
    say "posted $slug"
    posted=$((posted + 1))
done
say "$posted posted, $((waiting - posted)) waiting, $(echo "$slugs" | grep -c .) approved in all"
