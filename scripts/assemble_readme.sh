#!/usr/bin/env bash
# Maintainers: README.md is assembled from the sections in docs/readme_parts/ (one per area).
set -euo pipefail
cd "$(dirname "$0")/.."
parts=(00_intro models weights data training evaluation crf model_card zz_development)
{
  for p in "${parts[@]}"; do cat "docs/readme_parts/$p.md"; echo; done
} > README.md
echo "wrote README.md"
