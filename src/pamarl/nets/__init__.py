"""Networks: per-agent MLPs evaluated together, policies, critics and mixers."""
