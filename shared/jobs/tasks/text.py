"""text_stats: line, word and character counts, and the most frequent words."""

import re
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from shared.jobs.catalog import JobContext, JobResult, job_task

WORD = re.compile(r"[a-z0-9']+")


class TextStatsPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    top: int = Field(default=10, ge=0, le=10_000)


@job_task("text_stats")
def text_stats(payload: TextStatsPayload, context: JobContext) -> JobResult:
    """Counts of lines, words and characters, and the `top` most frequent words."""
    text = payload.text
    counts = Counter(WORD.findall(text.lower()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {
        "lines": len(text.splitlines()),
        "words": len(text.split()),
        "characters": len(text),
        "top_words": [[word, count] for word, count in ranked[: payload.top]],
    }
