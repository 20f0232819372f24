// The production stack: network, observability, NATS, the public edge and
// the service, wired together. See docs/aws.md for the design.
'use strict';

const { CfnOutput, CfnResource, Fn, Stack } = require('aws-cdk-lib');
const { checkov } = require('./suppress');
const { Network } = require('./network');
const { Observability } = require('./observability');
const { NatsCluster } = require('./nats-cluster');
const { Ingress } = require('./ingress');
const { Service } = require('./service');

const GIB = 1024 ** 3;

/**
 * What each scale tier buys (docs/aws.md, "Cost", shows the arithmetic).
 * Three bounds, each reserved in full on every node (stream replicas 3),
 * together within the volume's max_file_store (90 % of it), sized from
 * the bytes docs/performance.md measured (342 per id record, 528 per
 * publication, ~290 per event in chunks), rounded up to 350, 530 and 300:
 * - ids: the idempotency horizon, 24 h (rate x 86,400 s x 350 bytes);
 * - backlog: 30 minutes of the workers stopped at the tier's rate
 *   (rate x 1,800 s x 300 bytes) before ingest is refused;
 * - history: 1 h of publications, the SSE resume window (rate x 3,600 s x
 *   530 bytes), reserved twice (the failed stream has the same bound);
 * - and the subscriptions' dead letters at the service's default (64 MiB).
 */
const DEAD_LETTERS_GIB = 1 / 16;
const SIZING = {
  '1k': tier('m7g.large', 40, { idsGiB: 29, backlogGiB: 1, historyGiB: 2 }),
  '10k': tier('m7g.large', 370, { idsGiB: 282, backlogGiB: 6, historyGiB: 18 }),
  '100k': tier('m7g.2xlarge', 3600, { idsGiB: 2816, backlogGiB: 51, historyGiB: 178 }),
};

function tier(natsInstanceType, natsVolumeGiB, { idsGiB, backlogGiB, historyGiB }) {
  const maxFileStoreGiB = Math.floor(natsVolumeGiB * 0.9);
  const reserved = idsGiB + backlogGiB + 2 * historyGiB + DEAD_LETTERS_GIB;
  if (reserved > maxFileStoreGiB) {
    throw new Error(`streams (${idsGiB} + ${backlogGiB} + 2 x ${historyGiB} + ${DEAD_LETTERS_GIB} GiB) exceed ${maxFileStoreGiB} GiB of store`);
  }
  return {
    natsInstanceType,
    natsVolumeGiB: String(natsVolumeGiB),
    natsMaxFileStore: `${maxFileStoreGiB}Gi`,
    idsMaxBytes: String(idsGiB * GIB),
    backlogMaxBytes: String(backlogGiB * GIB),
    historyMaxBytes: String(historyGiB * GIB),
  };
}

class EventflowStack extends Stack {
  constructor(scope, id, props) {
    super(scope, id, props);
    // Context values (`cdk synth -c key=value`, or cdk.json's "context"),
    // read and checked at synth time: the template carries the values.
    const image = contextValue(this, 'imageUri', {
      fallback: 'ghcr.io/eventflow/eventflow:0.1.0',
      what: 'the eventflow image (linux/arm64), pinned by digest: ACCOUNT.dkr.ecr.REGION.amazonaws.com/eventflow@sha256:...',
    });
    const certificateArn = contextValue(this, 'certificateArn', {
      pattern: /^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate\/[0-9a-f-]+$/,
      what: 'the ACM certificate of the API\'s host name, for the HTTPS listener',
    });
    const natsImageId = contextValue(this, 'natsImageId', {
      pattern: /^ami-[0-9a-f]{8,17}$/,
      what: 'the AMI of the NATS nodes, pinned (Amazon Linux 2023, arm64): aws ssm get-parameter --name /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64 --query Parameter.Value',
    });
    const scale = contextValue(this, 'scale', {
      fallback: '10k',
      choices: Object.keys(SIZING),
      what: 'the sustained events per second the stack is sized for (docs/aws.md, "Cost")',
    });
    const size = SIZING[scale];

    const observability = new Observability(this, 'Observability');
    const network = new Network(this, 'Network', { key: observability.key });
    const nats = new NatsCluster(this, 'Nats', {
      vpc: network.vpc,
      imageId: natsImageId,
      instanceType: size.natsInstanceType,
      volumeGiB: Number(size.natsVolumeGiB),
      maxFileStore: size.natsMaxFileStore,
      logGroup: observability.natsLogs,
    });
    const ingress = new Ingress(this, 'Ingress', { vpc: network.vpc, certificateArn });
    const service = new Service(this, 'Eventflow', {
      vpc: network.vpc,
      image,
      natsUrl: nats.url,
      streams: {
        idsMaxBytes: size.idsMaxBytes,
        backlogMaxBytes: size.backlogMaxBytes,
        historyMaxBytes: size.historyMaxBytes,
      },
      observability,
      loadBalancer: ingress.loadBalancer,
      listener: ingress.listener,
    });
    nats.allowClients(service.securityGroup);
    acceptCdkInternals(this, service);

    new CfnOutput(this, 'ApiUrl', { value: `https://${ingress.loadBalancer.loadBalancerDnsName}`, description: 'point the API host name (CNAME) here' });
    new CfnOutput(this, 'TokensSecret', { value: service.tokens.secretArn, description: 'bearer tokens, comma-separated' });
    new CfnOutput(this, 'PrometheusWorkspace', { value: observability.workspace.attrPrometheusEndpoint, description: 'AMP: query endpoint for Amazon Managed Grafana' });
    new CfnOutput(this, 'AlertTopic', { value: observability.alerts.topicArn, description: 'subscribe the on-call rotation' });
  }

  // Environment-agnostic stacks see two AZs; name three (deploy-time values,
  // no lookup) so that the VPC and the NATS nodes span three.
  get availabilityZones() {
    return [0, 1, 2].map((i) => Fn.select(i, Fn.getAzs()));
  }
}

/**
 * What CDK itself emits and the scanners flag, accepted here with reasons:
 * the deploy-time Lambda behind `restrictDefaultSecurityGroup`, and
 * DependsOn entries that CDK adds although a Ref already orders them.
 */
function acceptCdkInternals(stack, service) {
  const lambdas = stack.node.findAll()
    .filter((c) => CfnResource.isCfnResource(c) && c.cfnResourceType === 'AWS::Lambda::Function');
  for (const lambda of lambdas) {
    const reason = 'CDK\'s deploy-time provider that strips the default security group\'s rules';
    checkov(lambda, [
      { id: 'CKV_AWS_115', comment: `${reason}: runs once a deployment, no concurrency to limit` },
      { id: 'CKV_AWS_116', comment: `${reason}: CloudFormation retries it and reports its failure, no queue needed` },
      { id: 'CKV_AWS_117', comment: `${reason}: it calls the EC2 API only and needs no VPC` },
    ]);
    cfnLintIgnore(lambda, 'W3005');
  }
  cfnLintIgnore(service.service.node.defaultChild, 'W3005');
}

/**
 * The context value `key`, or `fallback`; a missing required value, or one
 * that does not match `pattern` or `choices`, stops the synth naming it.
 */
function contextValue(scope, key, { fallback, pattern, choices, what }) {
  const value = scope.node.tryGetContext(key) ?? fallback;
  if (value === undefined) {
    throw new Error(`context value ${key} is required: ${what} (cdk synth -c ${key}=...)`);
  }
  if (typeof value !== 'string' || (pattern && !pattern.test(value)) || (choices && !choices.includes(value))) {
    throw new Error(`context value ${key} = ${JSON.stringify(value)} is not ${choices ? `one of ${choices.join(', ')}` : what}`);
  }
  return value;
}

/** cfn-lint's per-resource ignore (a redundant DependsOn that CDK writes). */
function cfnLintIgnore(resource, rule) {
  resource.addMetadata('cfn-lint', { config: { ignore_checks: [rule] } });
}

module.exports = { EventflowStack, SIZING };
