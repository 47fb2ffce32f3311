"""What the ECTrans services share: settings, Redis key names, the wire codec, task schemas."""
