"""Models over time: the periods a refresh trains and scores on (periods), the promote-or-keep gates (decision)
and the refresh loop that moves registry aliases (refresh). Imports hsflow.training and below."""
