"""Scoring captions, and reporting the scores.

  text       the scoring protocol's text: NFC, lowercase, punctuation stripped
  protocols  the two ways Vietnamese is counted (syllables, underthesea's words)
  metrics    pycocoevalcap's scorers under a protocol; the metrics file's layout
  spice      SPICE on the JVM
  results    the test references, and scoring a COCO results file
  report     the comparison: tables in the published layout, and a bar chart
"""
