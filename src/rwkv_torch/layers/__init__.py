"""nn.Module layers of each RWKV version: TimeMix and ChannelMix with the official inits."""
