class WeightSync:  # temporary stand-in until rollout.weight_sync.WeightSync lands
    def __init__(self, cfg, learners, engines, directory):
        self.cfg, self.learners, self.engines, self.directory = cfg, learners, engines, directory

    def push(self, version):
        handles = self.learners.call("publish_weights", self.cfg.transport, str(self.directory), version)
        self.engines.load_weights(self.cfg.transport, handles[0], self.cfg.timeout_s)

    def close(self):
        pass
