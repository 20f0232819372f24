// What the synthesized template must say: the design's numbers, checked
// on the CloudFormation CDK writes (node --test; no AWS account needed).
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { test } = require('node:test');
const { App, Validations } = require('aws-cdk-lib');
const { Match, Template } = require('aws-cdk-lib/assertions');
const { AwsSolutionsChecks } = require('cdk-nag');
const { EventflowStack, SIZING } = require('../lib/eventflow-stack');

// What `cdk synth -c ...` would give (docs/aws.md).
const CONTEXT = {
  certificateArn: 'arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000',
  natsImageId: 'ami-0123456789abcdef0',
};
const app = new App({ context: CONTEXT });
Validations.of(app).addPlugins(new AwsSolutionsChecks(app));
const stack = new EventflowStack(app, 'Test');
const template = Template.fromStack(stack);

test('the VPC spans three availability zones, each with a NAT gateway', () => {
  template.resourceCountIs('AWS::EC2::Subnet', 6);
  template.resourceCountIs('AWS::EC2::NatGateway', 3);
  const zones = Object.values(template.findResources('AWS::EC2::Subnet'))
    .map((subnet) => JSON.stringify(subnet.Properties.AvailabilityZone));
  assert.equal(new Set(zones).size, 3, `subnets in ${[...new Set(zones)]}`);
});

test('the ALB checks /readyz on the admin port and drains for 30 s', () => {
  template.hasResourceProperties('AWS::ElasticLoadBalancingV2::TargetGroup', {
    Port: 8080,
    HealthCheckPath: '/readyz',
    HealthCheckPort: '8081',
    TargetGroupAttributes: Match.arrayWith([{ Key: 'deregistration_delay.timeout_seconds', Value: '30' }]),
  });
  template.hasResourceProperties('AWS::ElasticLoadBalancingV2::Listener', { Protocol: 'HTTPS', Port: 443 });
  template.resourceCountIs('AWS::ElasticLoadBalancingV2::Listener', 1);
});

test('the drain fits: SIGKILL comes after the service\'s shutdown grace', () => {
  const [task] = Object.values(template.findResources('AWS::ECS::TaskDefinition'));
  const eventflow = task.Properties.ContainerDefinitions.find((c) => c.Name === 'eventflow');
  const env = Object.fromEntries(eventflow.Environment.map((e) => [e.Name, e.Value]));
  const grace = Number.parseInt(env.EVENTFLOW__SERVER__SHUTDOWN_GRACE, 10);
  assert.ok(eventflow.StopTimeout > grace, `stopTimeout ${eventflow.StopTimeout} s, grace ${grace} s`);
  assert.equal(eventflow.ReadonlyRootFilesystem, true);
  assert.equal(eventflow.User, '65532:65532');
  assert.equal(env.EVENTFLOW__BACKEND__KIND, 'nats');
  assert.equal(env.EVENTFLOW__BACKEND__NATS__REPLICAS, '3');
  // The tokens come from Secrets Manager, never from the environment.
  assert.equal(env.EVENTFLOW__AUTH__TOKENS, undefined);
  assert.deepEqual(eventflow.Secrets.map((s) => s.Name), ['EVENTFLOW__AUTH__TOKENS']);
});

test('the service scales on the JetStream backlog and on CPU, from 3 to 12 tasks', () => {
  template.hasResourceProperties('AWS::ApplicationAutoScaling::ScalableTarget', { MinCapacity: 3, MaxCapacity: 12 });
  template.hasResourceProperties('AWS::CloudWatch::Alarm', {
    Namespace: 'Eventflow',
    MetricName: 'eventflow_nats_backlog_bytes',
    Dimensions: [{ Name: 'Service', Value: 'eventflow' }],
    Statistic: 'Maximum',
  });
  // The autoscaler owns the count: a deployment does not reset it.
  const [service] = Object.values(template.findResources('AWS::ECS::Service'));
  assert.equal(service.Properties.DesiredCount, undefined);
  template.hasResourceProperties('AWS::ApplicationAutoScaling::ScalingPolicy', {
    TargetTrackingScalingPolicyConfiguration: Match.objectLike({
      PredefinedMetricSpecification: { PredefinedMetricType: 'ECSServiceAverageCPUUtilization' },
      TargetValue: 70,
    }),
  });
});

test('the collector writes the scaling metric with the dimension the alarm reads', () => {
  const [task] = Object.values(template.findResources('AWS::ECS::TaskDefinition'));
  const collector = task.Properties.ContainerDefinitions.find((c) => c.Name === 'collector');
  const config = collector.Environment.find((e) => e.Name === 'AOT_CONFIG_CONTENT').Value;
  // A JSON document joined around deploy-time values: keep its literal parts.
  const text = config['Fn::Join'][1].filter((part) => typeof part === 'string').join('');
  assert.ok(text.includes('"metric_relabel_configs":[{"action":"replace","target_label":"Service","replacement":"eventflow"}]'), text);
  assert.ok(text.includes('"dimensions":[["Service"]]'), text);
  assert.ok(text.includes('"^eventflow_nats_backlog_bytes$"'), text);
});

test('NATS runs on three nodes, each with an encrypted data volume of its own that outlives it', () => {
  template.resourceCountIs('AWS::EC2::Instance', 3);
  const volumes = template.findResources('AWS::EC2::Volume');
  assert.equal(Object.keys(volumes).length, 3);
  for (const volume of Object.values(volumes)) {
    assert.equal(volume.Properties.Encrypted, true);
    assert.equal(volume.Properties.VolumeType, 'gp3');
    assert.equal(volume.DeletionPolicy, 'Retain');
  }
  template.resourcePropertiesCountIs('AWS::EC2::VolumeAttachment', { Device: '/dev/sdf' }, 3);
  template.resourceCountIs('AWS::Route53::RecordSet', 3);
  // A pinned AMI: an AMI release does not replace the nodes.
  const images = Object.values(template.findResources('AWS::EC2::Instance'))
    .map((instance) => instance.Properties.ImageId);
  assert.ok(images.length > 0 && images.every((id) => id === CONTEXT.natsImageId), JSON.stringify(images));
});

test('the settings are context values, checked at synth: none missing, none malformed', () => {
  const synth = (context) => new EventflowStack(new App({ context }), 'Check');
  assert.throws(() => synth({ natsImageId: CONTEXT.natsImageId }), /context value certificateArn is required/);
  assert.throws(() => synth({ ...CONTEXT, natsImageId: 'latest' }), /context value natsImageId = "latest"/);
  assert.throws(() => synth({ ...CONTEXT, scale: '5k' }), /one of 1k, 10k, 100k/);
  const big = Template.fromStack(synth({ ...CONTEXT, scale: '100k' }));
  const env = Object.values(big.findResources('AWS::ECS::TaskDefinition'))[0].Properties.ContainerDefinitions
    .find((c) => c.Name === 'eventflow').Environment;
  const backlog = env.find((e) => e.Name === 'EVENTFLOW__BACKEND__NATS__BACKLOG_MAX_BYTES').Value;
  assert.equal(backlog, SIZING['100k'].backlogMaxBytes);
  assert.deepEqual(Object.keys(template.toJSON().Parameters ?? {}).filter((p) => !p.startsWith('BootstrapVersion')), []);
});

test('every scale tier fits its streams in the NATS store', () => {
  for (const [tier, size] of Object.entries(SIZING)) {
    const store = Number.parseInt(size.natsMaxFileStore, 10) * 1024 ** 3;
    const reserved = Number(size.idsMaxBytes) + Number(size.backlogMaxBytes) + 2 * Number(size.historyMaxBytes);
    assert.ok(reserved <= store, `${tier}: ${reserved} reserved, ${store} of store`);
    assert.ok(size.natsMaxFileStore.endsWith('Gi'), `${tier}: nats-server reads G as 10^9, Gi as 2^30`);
  }
});

test('AMP gets the alert rules of prometheus/alerts.yml, unchanged', () => {
  const rules = fs.readFileSync(path.join(__dirname, '..', '..', '..', 'prometheus', 'alerts.yml'), 'utf8');
  template.hasResourceProperties('AWS::APS::RuleGroupsNamespace', { Data: rules });
});

test('the task role may write to this workspace only, and read no secret', () => {
  const policies = Object.entries(template.findResources('AWS::IAM::Policy'))
    .filter(([id]) => id.includes('TaskRole'));
  assert.equal(policies.length, 1);
  const statements = policies[0][1].Properties.PolicyDocument.Statement;
  const actions = statements.flatMap((s) => [].concat(s.Action));
  assert.ok(actions.includes('aps:RemoteWrite'));
  assert.ok(!actions.some((a) => a.startsWith('secretsmanager:')), actions.join(', '));
  const remoteWrite = statements.find((s) => [].concat(s.Action).includes('aps:RemoteWrite'));
  assert.notEqual(remoteWrite.Resource, '*');
});

test('cdk-nag\'s AWS Solutions pack finds nothing unacknowledged', () => {
  const assembly = app.synth();
  const report = JSON.parse(fs.readFileSync(path.join(assembly.directory, 'validation-report.json'), 'utf8'));
  const violations = report.pluginReports.flatMap((r) => r.violations || []);
  assert.deepEqual(violations.map((v) => v.ruleName), []);
});
