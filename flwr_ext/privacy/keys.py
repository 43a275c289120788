"""Names of the privacy figures flwr-ext puts in MetricRecords and ConfigRecords.

Every ε key names its unit: ``dp-client-*`` figures protect one client's whole
dataset (user-level DP: :class:`flwr_ext.strategy.DPFedAvg`,
:class:`flwr_ext.strategy.DistributedDP`), ``dp-record-*`` figures protect one
record of one silo (DP-SGD: :func:`flwr_ext.privacy.make_private`). A dashboard
can then never show a record-level ε where a client-level one was meant.
"""

from __future__ import annotations

__all__ = [
    "CLIENT_DELTA",
    "CLIENT_EPSILON",
    "CLIPPING_NORM",
    "DDP_CLIPPING_NORM",
    "DDP_NOISE_STDDEV",
    "DDP_WEIGHT_KEY",
    "DISCARDED",
    "DROPPED",
    "EXPECTED_CLIENTS",
    "MIN_CLIENTS",
    "NEXT_CLIPPING_NORM",
    "NOISE_MULTIPLIER",
    "NOISE_STDDEV",
    "PARTICIPANTS",
    "RECORD_DELTA",
    "RECORD_EPSILON",
    "RECORD_NOISE_MULTIPLIER",
    "RECORD_STEPS",
    "RELEASES",
    "SAMPLED",
    "SAMPLING_RATE",
    "SILOS_REPORTING",
    "UNCLIPPED_FRACTION",
    "UPDATE_NOISE_MULTIPLIER",
]

# --- user-level (client-level) DP, in the server's round MetricRecord ---------
#: Cumulative ε per client after this round's release.
CLIENT_EPSILON = "dp-client-epsilon"
#: δ the client-level ε is reported at.
CLIENT_DELTA = "dp-client-delta"
#: Accounted noise multiplier z of the round's release (update and, with adaptive
#: clipping, the clipped count, together).
NOISE_MULTIPLIER = "dp-noise-multiplier"
#: Noise multiplier of the update alone (> z with adaptive clipping).
UPDATE_NOISE_MULTIPLIER = "dp-update-noise-multiplier"
#: Clip norm C that clipped this round's updates.
CLIPPING_NORM = "dp-clipping-norm"
#: Clip norm for the next round (adaptive clipping).
NEXT_CLIPPING_NORM = "dp-next-clipping-norm"
#: Noise standard deviation per coordinate: of the mean (central DP) or of each
#: client's share (distributed DP).
NOISE_STDDEV = "dp-noise-stddev"
#: Poisson sampling rate q (1.0: full participation, no amplification).
SAMPLING_RATE = "dp-sampling-rate"
#: The fixed public denominator m of the mean.
EXPECTED_CLIENTS = "dp-expected-clients"
#: Minimum number of reporting clients t (distributed DP).
MIN_CLIENTS = "dp-min-clients"
#: Clients sent a train instruction this round.
SAMPLED = "dp-sampled"
#: Valid replies that entered the aggregate.
PARTICIPANTS = "dp-participants"
#: Replies dropped as invalid.
DROPPED = "dp-dropped"
#: 1 if the round was discarded (too few valid replies for the noise), else 0.
DISCARDED = "dp-discarded"
#: Releases accounted so far.
RELEASES = "dp-releases"
#: Noised fraction of unclipped updates (adaptive clipping).
UNCLIPPED_FRACTION = "dp-unclipped-fraction"

# --- record-level DP (DP-SGD in a silo), in a silo's train reply --------------
#: The silo's cumulative ε per record.
RECORD_EPSILON = "dp-record-epsilon"
#: δ per record.
RECORD_DELTA = "dp-record-delta"
#: The silo's DP-SGD noise multiplier.
RECORD_NOISE_MULTIPLIER = "dp-record-noise-multiplier"
#: DP-SGD steps the silo has taken in this run.
RECORD_STEPS = "dp-record-steps"
#: Server side: number of silos that reported a record-level ε this round.
SILOS_REPORTING = "dp-silos-reporting"

# --- distributed DP: train-instruction ConfigRecord and reply markers ---------
#: Clip norm each client applies to its update.
DDP_CLIPPING_NORM = "ddp-clipping-norm"
#: Standard deviation of each client's noise share.
DDP_NOISE_STDDEV = "ddp-noise-stddev"
#: Name of the weight metric the mod sets to 1 (the strategy's weighted_by_key).
DDP_WEIGHT_KEY = "ddp-weight-key"
